"""Building blocks of the end-to-end pipeline tests: a tiny model and corpus, a config, and the
in-process reference the pipeline's results are compared with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from segprop_ray.config import Config, validate_config
from segprop_ray.core.assemble import exit_config, exit_state_dict, write_model_dir
from segprop_ray.core.inprocess import run_inprocess
from segprop_ray.core.parts import ModelParts
from segprop_ray.core.plan import exit_is_tied
from segprop_ray.demo.corpus import generate_corpus, write_jsonl
from segprop_ray.demo.tiny_model import make_tiny_model
from segprop_ray.reporting.export import open_run
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.shard_format import ShardSpec
from segprop_ray.storage.shard_read import read_token_blocks

NUM_LAYERS, BASE_DEPTH, LAST_LAYERS = 4, 0, 2  # Stage 1: layer 0 + LL (2, 3); Stage 2: layer 1


def make_inputs(root: Path) -> tuple[Path, Path, Path]:
    """A tiny Llama and train/eval corpora under ``root``."""
    model = make_tiny_model(root / "model", "llama", num_layers=NUM_LAYERS, hidden=32)
    train = write_jsonl(generate_corpus(160, seed=0), root / "data" / "train.jsonl")
    evaluation = write_jsonl(generate_corpus(20, seed=1), root / "data" / "eval.jsonl")
    return model, train, evaluation


def pipeline_config(run_dir: str, model: str, train: str, eval_data: str, **sections: Any) -> dict[str, Any]:
    """A small, fast pipeline config (as a mapping, to write or to validate)."""
    raw: dict[str, Any] = {
        "run_dir": run_dir,
        "model": model,
        "data": {"train": train, "eval": eval_data, "seq_len": 32},
        "segprop": {"base_depth": BASE_DEPTH, "last_layers": LAST_LAYERS},
        "training": {"learning_rate": 3e-3, "max_steps": 6, "per_device_train_batch_size": 4, "save_steps": 2,
                     "logging_steps": 1, "max_eval_blocks": 8},
        "snapcheck": {"rows_per_group": 4, "groups_per_file": 2},
    }
    for name, value in sections.items():
        raw[name] = {**raw.get(name, {}), **value} if isinstance(value, dict) else value
    return raw


def write_config(path: Path, raw: dict[str, Any]) -> Path:
    """Write a config mapping as YAML."""
    path.write_text(yaml.safe_dump(raw))
    return path


def inprocess_reference(cfg: Config, model_dir: Path, layout: RunLayout, num_blocks: dict[str, int]):
    """The in-process core's result on the very token blocks the pipeline wrote."""
    hidden = AutoConfig.from_pretrained(model_dir).hidden_size
    snap = cfg.snapcheck
    spec = ShardSpec.for_snapcheck(cfg.data.seq_len, hidden, snap.dtype, snap.rows_per_group, snap.groups_per_file)
    train = read_token_blocks(layout, "train", spec, num_blocks["train"])
    evaluation = read_token_blocks(layout, "eval", spec, num_blocks["eval"])
    return run_inprocess(str(model_dir), train, evaluation, cfg), evaluation.input_ids


def reference_model(result, model_dir: Path, depth: int, out: Path):
    """The in-process result at ``depth`` assembled and loaded as an HF model."""
    config = AutoConfig.from_pretrained(model_dir)
    parts = ModelParts(config)
    state = exit_state_dict(result.plan, parts.layout, depth, result.committed, result.exits[depth],
                            tied=exit_is_tied(result.plan, depth, parts.tied))
    write_model_dir(out, exit_config(config, result.plan, depth), state)
    return AutoModelForCausalLM.from_pretrained(out).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits without gradients."""
    with torch.no_grad():
        return model(ids).logits


def load_config_of(run_dir: str) -> Config:
    """The config a run was made with (its resolved YAML, storage options empty)."""
    layout, _ = open_run(run_dir)
    raw = yaml.safe_load(layout.fs.cat_file(layout.config_resolved))
    return validate_config({**raw, "storage_options": {}})
