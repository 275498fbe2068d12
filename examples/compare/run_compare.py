"""SegProp vs layer-wise (lw) vs end-to-end (e2e) on the same tiny model and data, and one report comparing them.

    .venv/bin/python examples/compare/run_compare.py --out .compare [--set training.learning_rate=1e-3 ...]

Builds the demo's tiny 8-layer Llama, corpus and multiple-choice items under OUT (``segprop demo``'s
pieces and config), then runs ``segprop compare`` on them -- modes segprop, lw and e2e, each in
its own run directory under OUT/runs, e2e with the step budget of the whole segprop run -- and
writes the comparison's report (Table 1, Figure 2) to OUT/report. Every run is resumable: run the
script again to continue; a finished run is skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segprop_ray.cli import main as segprop_main
from segprop_ray.config import load_config
from segprop_ray.config.schema import EvaluationConfig
from segprop_ray.demo.run import prepare_demo

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


def run_spec(mode: str, e2e_budget: dict[str, float] | None) -> str:
    """The ``segprop compare`` run of ``mode`` (named after it: its run directory is OUT/runs/<mode>)."""
    if mode != "e2e" or not e2e_budget:
        return mode
    # as many optimizer steps (or passes over the data) as the whole segprop run
    return "e2e:" + ",".join(f"training.{key}={value}" for key, value in e2e_budget.items())


def compare_args(config: Path, out: Path, modes: list[str], overrides: list[str],
                 e2e_budget: dict[str, float] | None) -> list[str]:
    """The ``segprop compare`` command line of the example: one run per mode, the overrides for every run."""
    args = ["compare", str(config), "--out", str(out)]
    args += [item for mode in modes for item in ("--runs", run_spec(mode, e2e_budget))]
    return args + [item for override in overrides for item in ("--set", override)]


def main(argv: list[str] | None = None) -> int:
    """Prepare the demo pieces, then run the chosen modes with ``segprop compare`` (its exit code)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".compare", help="working directory (model, data, runs, report)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable; run_dir and mode are set per run)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes to run (default: all three)")
    args = parser.parse_args(argv)
    modes = parse_modes(args.modes)
    out = Path(args.out).resolve()
    config = prepare_demo(out)
    overrides = common_overrides(args.overrides)
    e2e_budget = segprop_budget(config, overrides) if "e2e" in modes else None
    command = compare_args(config, out, modes, overrides, e2e_budget)
    print("$ segprop " + " ".join(command), flush=True)
    return segprop_main(command)


if __name__ == "__main__":
    sys.exit(main())
