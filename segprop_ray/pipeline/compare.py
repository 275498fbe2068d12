"""Running a comparison: every run of the set one after another in this process (one Ray for all), then its report.

Before any run starts, every run is checked against the input model (a run that leaves no middle layer
is refused) and against its run directory (one that holds a run of another config is refused, naming
what differs). A run whose manifest says ``done`` is skipped without starting its driver; any other
(interrupted, failed) continues through the driver's own resume, so the same command run again
finishes an interrupted set without retraining what is finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from segprop_ray.config import ConfigError
from segprop_ray.config.compare import CompareRun, CompareSet
from segprop_ray.pipeline.prepare import config_conflict, inspect_model
from segprop_ray.reporting.compare_report import write_compare_report
from segprop_ray.storage.fs import check_writable
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.manifest import Manifest, ManifestStore


@dataclass
class RunState:
    """A run of the set and what its run directory holds now."""

    run: CompareRun
    manifest: Manifest | None

    @property
    def done(self) -> bool:
        """Whether the run has finished (its manifest's state is ``done``)."""
        return self.manifest is not None and self.manifest.state == "done"


def existing_runs(compare: CompareSet) -> list[RunState]:
    """Each run with the manifest its run directory holds (None for a new one); a run directory that holds a run of
    another config is refused in one line."""
    states = []
    for run in compare.runs:
        manifest = ManifestStore(RunLayout.open(run.cfg.run_dir, run.cfg.storage_options)).read()
        changed = config_conflict(run.cfg, manifest) if manifest is not None else None
        if changed:
            raise ConfigError(f"run {run.name!r}: {run.cfg.run_dir} holds a run of another config (differs in: "
                              f"{', '.join(changed)}); remove that directory or choose another --out")
        states.append(RunState(run, manifest))
    return states


def check_against_model(compare: CompareSet) -> None:
    """Every run's settings against the input model (one line naming the run, e.g. one that leaves no middle layer)."""
    info, _ = inspect_model(compare.runs[0].cfg)  # every run has the same model (config.compare.SHARED_SETTINGS)
    for run in compare.runs:
        try:
            run.cfg.check_against_model(info.num_layers)
        except ValueError as err:
            raise ConfigError(f"run {run.name!r} ({run.text}): {err}") from None


def run_compare(compare: CompareSet, echo: Callable[[str], None] = print,
                report_only: bool = False) -> dict[str, str]:
    """Run (or continue) every unfinished run of the set, then write the report; returns its files (name -> path).

    ``report_only``: run nothing, report the runs that have a run directory (finished or not).
    """
    check_writable(compare.out, compare.storage_options)
    states = existing_runs(compare)
    if not report_only:
        check_against_model(compare)
        for index, state in enumerate(states, 1):
            state.manifest = _run_one(state, f"[{index}/{len(states)}] {state.run.name}", echo)
    present = [(state.run.name, state.run.cfg.run_dir, state.manifest) for state in states if state.manifest]
    if not present:
        raise ConfigError(f"no run of the set has a run directory under {compare.out} yet")
    return write_compare_report(compare.out, present, compare.spec, compare.storage_options)


def _run_one(state: RunState, tag: str, echo: Callable[[str], None]) -> Manifest:
    """Run ``state``'s run through its driver unless it is done; returns its manifest."""
    if state.done:
        echo(f"{tag}: done, skipped ({state.run.cfg.run_dir})")
        return state.manifest
    from segprop_ray.pipeline.driver import Driver  # Ray and torch only once a run has to train

    echo(f"{tag}: {'continuing' if state.manifest else 'starting'} {state.run.text} in {state.run.cfg.run_dir}")
    try:
        return Driver(state.run.cfg).run()
    except BaseException:
        echo(f"{tag}: stopped; finished runs are kept: run the same command again to continue")
        raise
