"""``segprop demo``: the embedded default, end to end on this machine.

Makes a tiny Llama (8 layers) with a word-level tokenizer and a synthetic corpus, writes the
config it runs with (so ``segprop run OUT/config.yaml`` repeats or continues it), then runs the
real pipeline on a local Ray: Ray Data tokenization and snapshots, Ray Train segment trainers,
a local run directory, the final model exported as a Hugging Face directory.
"""

from __future__ import annotations

from pathlib import Path

from segprop_ray.demo.corpus import generate_corpus, generate_mc_items, write_jsonl, write_mc_jsonl
from segprop_ray.demo.tiny_model import make_tiny_model

DEMO_CONFIG = """\
# The demo run: a tiny 8-layer Llama on a synthetic corpus, SegProp with p = 2 and r = 2
# (Stage 1 trains layers 0..2 with LL = layers 6, 7; Stage 2 trains layers 3, 4, 5 one by one).
run_dir: {out}/run
model: {out}/model
data:
  train: {out}/data/train.jsonl
  eval: {out}/data/eval.jsonl
  seq_len: 64
segprop:
  mode: segprop
  base_depth: 2
  last_layers: 2
training:
  learning_rate: 3.0e-3
  max_steps: 40
  per_device_train_batch_size: 16
  warmup_ratio: 0.1
  weight_decay: 0.01
  eval_steps: 20
  save_steps: 20
  seed: 0
stage1:
  max_steps: 120
snapcheck:
  dtype: bf16
evaluation:
  mc_path: {out}/data/mc.jsonl
  prompt_style: cloze
  nhsic_tokens: 256
resources:
  num_cpus: 2
"""


def prepare_demo(out: str | Path) -> Path:
    """Write the tiny model, the corpus and the config under ``out`` (kept if already there); returns the config."""
    out = Path(out).resolve()
    if not (out / "model" / "config.json").is_file():
        make_tiny_model(out / "model", "llama", num_layers=8, hidden=64)
    if not (out / "data" / "mc.jsonl").is_file():
        write_jsonl(generate_corpus(3000, seed=0), out / "data" / "train.jsonl")
        write_jsonl(generate_corpus(200, seed=1), out / "data" / "eval.jsonl")
        write_mc_jsonl(generate_mc_items(200, seed=2), out / "data" / "mc.jsonl")
    config = out / "config.yaml"
    if not config.is_file():
        config.write_text(DEMO_CONFIG.format(out=out))
    return config


def run_demo(out: str | Path, overrides: list[str]) -> int:
    """Prepare and run the demo; print where the results are."""
    from segprop_ray.config import load_config
    from segprop_ray.pipeline.driver import Driver
    from segprop_ray.reporting.report import write_report
    from segprop_ray.reporting.status import render_status

    config_path = prepare_demo(out)
    print(f"demo config: {config_path}")
    cfg = load_config(config_path, overrides)
    manifest = Driver(cfg).run()
    render_status(manifest)
    written = write_report(cfg.run_dir, storage_options=cfg.storage_options)
    print(f"run directory: {cfg.run_dir}")
    print(f"report: {written.get('report.md')}")
    exported = f"{cfg.run_dir.rstrip('/')}/export/exit-{manifest.final_depth}"  # a URI as given: Path() mangles s3://
    print(f"final model (Hugging Face format): {exported}")
    print(f"status any time: segprop status {cfg.run_dir}")
    return 0
