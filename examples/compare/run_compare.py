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


def segprop_step_budget(config: Path, overrides: list[str]) -> int:
    """Optimizer steps of the segprop run: Stage 1's, plus one iteration's per middle layer."""
    from transformers import AutoConfig

    cfg = load_config(config, overrides)
    num_layers = AutoConfig.from_pretrained(cfg.model).num_hidden_layers
    middle_layers = num_layers - (cfg.segprop.base_depth + 1) - cfg.segprop.last_layers
    return cfg.training_for("stage1").max_steps + middle_layers * cfg.training.max_steps


def mode_overrides(out: Path, mode: str, e2e_steps: int) -> list[str]:
    """``--set`` overrides that turn the demo config into the run of ``mode`` in its own run directory."""
    overrides = [f"run_dir={out / 'runs' / mode}", f"segprop.mode={mode}"]
    if mode == "e2e":  # as many optimizer steps as the whole segprop run
        overrides.append(f"training.max_steps={e2e_steps}")
    return overrides


def run_mode(config: Path, overrides: list[str]) -> None:
    """``segprop run`` in its own process (its own local Ray)."""
    command = [sys.executable, "-m", "segprop_ray.cli", "run", str(config)]
    for override in overrides:
        command += ["--set", override]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


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
    out = Path(args.out).resolve()
    config = prepare_demo(out)
    overrides = common_overrides(args.overrides)
    e2e_steps = segprop_step_budget(config, overrides)
    for mode in args.modes.split(","):
        run_mode(config, overrides + mode_overrides(out, mode, e2e_steps))
    print(f"report: {write_comparison(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
