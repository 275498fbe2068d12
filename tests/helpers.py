"""Small builders shared by the tests: tiny models from configs, token blocks, configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from segprop_ray.config import Config, validate_config
from segprop_ray.demo.corpus import generate_corpus
from segprop_ray.demo.tiny_model import build_tokenizer, make_tiny_model


def tiny_model_dir(tmp: Path, family: str = "llama", num_layers: int = 6, hidden: int = 32, **overrides: Any) -> Path:
    """A random tiny model of ``family`` saved with the demo tokenizer."""
    return make_tiny_model(tmp / f"{family}-{num_layers}", family, num_layers=num_layers, hidden=hidden, **overrides)


def corpus_blocks(num_blocks: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """(num_blocks, seq_len) token ids of the demo corpus, packed with EOS between documents."""
    tokenizer = build_tokenizer()
    stream: list[int] = []
    docs = iter(generate_corpus(10_000, seed))
    while len(stream) < num_blocks * seq_len:
        stream += tokenizer(next(docs))["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(stream[: num_blocks * seq_len]).view(num_blocks, seq_len)  # (N, T)


def _segprop_defaults(mode: str) -> dict[str, int]:
    """p = 1 and r = 2, as far as ``mode`` uses them (a setting a mode does nothing with is refused)."""
    from segprop_ray.config.segprop import unused_settings

    return {k: v for k, v in {"base_depth": 1, "last_layers": 2}.items() if k not in unused_settings(mode)}


def make_config(model_dir: Path | str, **sections: Any) -> Config:
    """A validated config for ``model_dir`` with small defaults, sections overridden by keyword."""
    raw: dict[str, Any] = {
        "run_dir": "unused",
        "model": str(model_dir),
        "data": {"train": "unused", "seq_len": 16},
        "segprop": _segprop_defaults(sections.get("segprop", {}).get("mode", "segprop")),
        "training": {"learning_rate": 1e-2, "max_steps": 6, "per_device_train_batch_size": 4, "logging_steps": 2},
        "snapcheck": {"rows_per_group": 4},
    }
    for name, value in sections.items():
        raw[name] = {**raw.get(name, {}), **value} if isinstance(value, dict) else value
    return validate_config(raw)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """``segprop ARGS`` in this process: (exit code, stdout, stderr)."""
    from segprop_ray.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    """The one non-empty line of ``err`` (fails the test if there are more)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def upload(local_dir: Path, uri: str) -> str:
    """Copy the files of ``local_dir`` to the directory ``uri`` (any fsspec URI); returns ``uri``."""
    from segprop_ray.storage.fs import resolve_filesystem

    fs, path = resolve_filesystem(uri)
    for file in local_dir.iterdir():
        fs.put_file(str(file), f"{path}/{file.name}")
    return uri


def plain_e2e_loop(model_dir: Path | str, train: torch.Tensor, cfg: Config, steps: int, hidden: int = 32):
    """E2E as a plain PyTorch loop on the HF model itself (the reference the project's e2e must equal): HF's loss on
    the same micro-batches, AdamW, a linear schedule, clipping; a tied model keeps its one shared tensor."""
    from transformers import AutoModelForCausalLM, get_scheduler

    from segprop_ray.core.data_order import BlockOrder
    from segprop_ray.core.inprocess import group_size_for
    from segprop_ray.core.plan import segment_seed

    args = cfg.training
    torch.manual_seed(segment_seed(args.seed, 3))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=steps)
    group_size = group_size_for(cfg.snapcheck, train.shape[1], hidden)
    order = BlockOrder(len(train), group_size, args.per_device_train_batch_size, args.seed, True)
    for rows in order.epoch_batches(0)[:steps]:
        ids = train[torch.tensor(rows)]  # (B, T)
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    return model.eval()
