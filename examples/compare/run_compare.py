"""SegProp vs layer-wise (lw) vs end-to-end (e2e) on the same tiny model and data, and one report comparing them.

    .venv/bin/python examples/compare/run_compare.py --out .compare [--set training.learning_rate=1e-3 ...]

Builds the demo's tiny 8-layer Llama, corpus and multiple-choice items under OUT (``segprop demo``'s
pieces and config), runs ``segprop run`` three times -- modes segprop, lw and e2e, each in its own
run directory under OUT/runs, e2e with the step budget of the whole segprop run -- and writes the
comparison report to OUT/report. Every run is resumable: run the script again to continue.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from segprop_ray.config import load_config
from segprop_ray.config.schema import EvaluationConfig
from segprop_ray.demo.run import prepare_demo
from segprop_ray.reporting.report import write_report

MODES = ("segprop", "lw", "e2e")
DEFAULT_OVERRIDES = ["stage1.max_steps=240", "training.max_steps=80"]
"""A longer budget than the demo's: about 500 steps are what the tiny model needs to learn the corpus's facts."""


def common_overrides(user_overrides: list[str]) -> list[str]:
    """The example's defaults, the cloze prompt style where the config has it, then the user's overrides."""
    style = ["evaluation.prompt_style=cloze"] if "prompt_style" in EvaluationConfig.model_fields else []
    return DEFAULT_OVERRIDES + style + user_overrides


def parse_modes(text: str) -> list[str]:
    """The comma-separated ``--modes`` value as a list; SystemExit with one line naming an unknown mode."""
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        problem = f"unknown mode {', '.join(unknown)}" if unknown else "no mode given"
        raise SystemExit(f"run_compare.py: error: --modes {text!r}: {problem}; allowed: {', '.join(MODES)}")
    return modes


def segprop_budget(config: Path, overrides: list[str]) -> dict[str, float]:
    """The training budget of the whole segprop run, as ``training.*`` settings for the e2e run."""
    from transformers import AutoConfig

    cfg = load_config(config, overrides)
    return budget_for(cfg, AutoConfig.from_pretrained(cfg.model).num_hidden_layers)


def budget_for(cfg, num_layers: int) -> dict[str, float]:
    """Stage 1's budget plus one iteration's per middle layer: optimizer steps when both stages count steps,
    else (``max_steps: -1``, both counting epochs) passes over the data; one-line SystemExit when they mix."""
    middle_layers = num_layers - (cfg.segprop.base_depth + 1) - cfg.segprop.last_layers
    stage1, stage2 = cfg.training_for("stage1"), cfg.training
    if stage1.max_steps > 0 and stage2.max_steps > 0:
        return {"max_steps": stage1.max_steps + middle_layers * stage2.max_steps}
    if stage1.max_steps <= 0 and stage2.max_steps <= 0:
        return {"max_steps": -1, "num_train_epochs": stage1.num_train_epochs + middle_layers * stage2.num_train_epochs}
    raise SystemExit("run_compare.py: error: the e2e budget needs stage1.max_steps and training.max_steps both "
                     f"positive or both -1 (epochs), got {stage1.max_steps} and {stage2.max_steps}")


def mode_overrides(out: Path, mode: str, e2e_budget: dict[str, float] | None) -> list[str]:
    """``--set`` overrides that turn the demo config into the run of ``mode`` in its own run directory."""
    overrides = [f"run_dir={out / 'runs' / mode}", f"segprop.mode={mode}"]
    if mode == "e2e":  # as many optimizer steps (or passes over the data) as the whole segprop run
        overrides += [f"training.{key}={value}" for key, value in (e2e_budget or {}).items()]
    return overrides


def run_mode(config: Path, overrides: list[str]) -> None:
    """``segprop run`` in its own process (its own local Ray)."""
    command = [sys.executable, "-m", "segprop_ray.cli", "run", str(config)]
    for override in overrides:
        command += ["--set", override]
    print("$", " ".join(command), flush=True)
    code = subprocess.run(command).returncode
    if code:  # segprop has printed its one-line reason
        raise SystemExit(f"run_compare.py: error: segprop run exited with {code}; run the script again to continue")


def write_comparison(out: Path) -> str:
    """The report of the segprop run with the other finished runs beside it; returns report.md's path."""
    runs = {mode: str(out / "runs" / mode) for mode in MODES if (out / "runs" / mode / "manifest.json").is_file()}
    if not runs:
        raise SystemExit(f"no finished run under {out / 'runs'}")
    main_run = runs.pop("segprop") if "segprop" in runs else runs.pop(next(iter(runs)))
    return write_report(main_run, out=str(out / "report"), compare=list(runs.values()))["report.md"]


def main(argv: list[str] | None = None) -> int:
    """Prepare the demo pieces, run the chosen modes, write the report and say where it is."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".compare", help="working directory (model, data, runs, report)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for all three runs (repeatable; run_dir and mode are set per run)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes to run (default: all three)")
    args = parser.parse_args(argv)
    modes = parse_modes(args.modes)
    out = Path(args.out).resolve()
    config = prepare_demo(out)
    overrides = common_overrides(args.overrides)
    e2e_budget = segprop_budget(config, overrides) if "e2e" in modes else None
    for mode in modes:
        run_mode(config, overrides + mode_overrides(out, mode, e2e_budget))
    print(f"report: {write_comparison(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
