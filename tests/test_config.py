"""Configs: stable names, overrides, and a one-line error for each impossible setting."""

import re
from pathlib import Path

import pytest

from segprop_ray.config import ConfigError, load_config, validate_config
from segprop_ray.config.loading import apply_overrides

MINIMAL = {"run_dir": "runs/x", "model": "some/model", "data": {"train": "train.jsonl"}}


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_names_users_rely_on(tmp_path):
    path = write(tmp_path, """
run_dir: s3://bucket/run
model: meta-llama/Llama-3.2-1B
data: {train: t.jsonl, eval: e.jsonl, seq_len: 1024}
segprop: {mode: lw, base_depth: 4, last_layers: 2}
training:
  learning_rate: 1.0e-4
  num_train_epochs: 2
  max_steps: 100
  per_device_train_batch_size: 4
  gradient_accumulation_steps: 8
  max_grad_norm: 0.5
  lr_scheduler_type: cosine
  warmup_ratio: 0.03
  weight_decay: 0.01
  bf16: true
  seed: 7
""")
    cfg = load_config(path)
    assert (cfg.run_dir, cfg.data.eval, cfg.data.seq_len) == ("s3://bucket/run", "e.jsonl", 1024)
    assert (cfg.segprop.mode, cfg.segprop.base_depth, cfg.segprop.effective_last_layers) == ("lw", 4, 0)
    t = cfg.training
    assert (t.learning_rate, t.max_steps, t.gradient_accumulation_steps, t.lr_scheduler_type, t.bf16, t.seed) == (
        1e-4, 100, 8, "cosine", True, 7)


def test_overrides_parse_yaml_values(tmp_path):
    path = write(tmp_path, "run_dir: a\nmodel: m\ndata: {train: t}\n")
    cfg = load_config(path, ["training.learning_rate=0", "segprop.base_depth=3", "data.train=[a, b]",
                             "training.bf16=true", "stage1.max_steps=9"])
    assert cfg.training.learning_rate == 0 and cfg.segprop.base_depth == 3 and cfg.data.train == ["a", "b"]
    assert cfg.training.bf16 is True and cfg.training_for("stage1").max_steps == 9
    assert cfg.segprop.last_layers == 2  # default r


@pytest.mark.parametrize("raw,overrides,message", [
    ({"run_dir": "a", "data": {"train": "t"}}, [], "missing required key 'model'"),
    (MINIMAL, ["segprop.last_layers=-1"], "segprop.last_layers: Input should be greater than or equal to 0"),
    (MINIMAL, ["segprop.basedepth=3"], "unknown key 'segprop.basedepth'"),
    (MINIMAL, ["learning_rate=1"], "unknown key 'learning_rate'"),
    (MINIMAL, ["segprop.mode=fast"], "segprop.mode: Input should be 'segprop', 'lw', 'e2e' or 'lora'"),
    (MINIMAL, ["stage1.lr=3"], "unknown training field(s) ['lr']"),
    (MINIMAL, ["training.max_steps=0"], "max_steps is 0"),
    (MINIMAL, ["model="], "config: model: must not be empty (got '')"),
    (MINIMAL, ["training"], "expected KEY=VALUE"),
    (MINIMAL, ["resources.snapshot.files_per_actor=2"], "files_per_actor = 2 needs num_cpus >= 2"),
    (MINIMAL, ["snapcheck.upload_part_mib=4"], "snapcheck.upload_part_mib: Input should be greater than or equal to 5"),
    (MINIMAL, ["snapcheck.read_threads=0"], "snapcheck.read_threads: Input should be greater than or equal to 1"),
    (MINIMAL, ["segprop.granularity=sublayer", "segprop.segment_layers=2"], "granularity sublayer trains the halves "
     "of one layer at a time: it needs segment_layers 1"),
    (MINIMAL, ["segprop.mode=e2e", "segprop.segment_layers=2"], "segprop: segment_layers = 2 does nothing in mode "
     "e2e: it trains every layer at once, with no base prefix, LL or Stage 2; leave it out"),
    (MINIMAL, ["segprop.mode=e2e", "segprop.base_depth=3"], "segprop: base_depth = 3 does nothing in mode e2e"),
    (MINIMAL, ["segprop.mode=lora", "segprop.last_layers=4"], "segprop: last_layers = 4 does nothing in mode lora: it "
     "trains LoRA adapters on every layer at once"),
    (MINIMAL, ["segprop.mode=lw", "segprop.last_layers=4"], "segprop: last_layers = 4 does nothing in mode lw: its LL "
     "is the LM head alone (r = 0); leave it out"),
    (MINIMAL, ["segprop.mode=e2e", "segprop.adapter={r: 4}"], "adapter with mode e2e: use mode lora"),
    (MINIMAL, ["segprop.mode=lw", "segprop.adapter={r: 4}"], "segprop: adapter with mode lw: lw's LL is the LM head "
     "alone, which adapters leave frozen"),
    (MINIMAL, ["segprop.adapter={type: ia3}"], "segprop.adapter.type: Input should be 'lora'"),
    (MINIMAL, ["training.optim=adafactor"], "training.optim: Input should be 'adamw_torch' or 'adamw_8bit'"),
    (MINIMAL, ["training.head_loss=liger"], "training.head_loss: Input should be 'auto', 'chunked' or 'fused'"),
])
def test_bad_configs_give_one_line_errors(raw, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate_config(apply_overrides(raw, overrides))
    text = str(err.value)
    assert message in text and "\n" not in text


def test_defaults_of_settings_a_mode_does_not_use_are_accepted_and_survive_the_trip_to_the_workers():
    """A config travels to the workers as a full dump (every default written out): it must validate again."""
    for mode in ("e2e", "lora", "lw"):
        cfg = validate_config({**MINIMAL, "segprop": {"mode": mode}})
        assert validate_config(cfg.model_dump(mode="json")) == cfg
    lw = validate_config({**MINIMAL, "segprop": {"mode": "lw", "base_depth": 3}})  # lw uses p
    assert (lw.segprop.base_depth, lw.segprop.effective_last_layers) == (3, 0)


def test_base_depth_plus_last_layers_checked_against_model():
    cfg = validate_config({**MINIMAL, "segprop": {"base_depth": 4, "last_layers": 2}})
    cfg.check_against_model(num_layers=8)  # layers 0..4 prefix, 5 middle, 6..7 LL
    with pytest.raises(ValueError, match="leaves no middle layer in a 7-layer model") as err:
        cfg.check_against_model(num_layers=7)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="no middle layer"):
        validate_config({**MINIMAL, "segprop": {"base_depth": 6, "last_layers": 2}}).check_against_model(8)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "a: [1, 2\n"))


def test_readme_example_config_is_valid():
    """The config shown in README.md passes validation as written (docs that match the code)."""
    import yaml

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = yaml.safe_load(readme.split("```yaml\n", 1)[1].split("```", 1)[0])
    cfg = validate_config(example)
    assert cfg.training.loss_chunk_tokens == 0 and cfg.training_for("stage1").max_steps == 2000


@pytest.mark.parametrize("exit_layer,eval_steps,message", [
    ({"patience": 3}, 0, "exit.layer.patience needs training.eval_steps > 0"),
    ({"target_loss": 2.0}, 0, "exit.layer.target_loss needs training.eval_steps > 0"),
    ({"patience": 3}, 10, None),
])
def test_layer_exit_without_evaluations_is_refused(exit_layer, eval_steps, message):
    raw = {**MINIMAL, "exit": {"layer": exit_layer},
           "training": {"eval_steps": eval_steps}}
    partly = {**raw, "training": {"eval_steps": 10}, "stage1": {"eval_steps": 0}}  # Stage 2 can still stop early
    validate_config(partly)
    validate_config({**partly, "segprop": {"mode": "e2e"}})  # e2e trains no Stage 1
    if message is None:
        validate_config(raw)
    else:
        with pytest.raises(ConfigError, match=message):
            validate_config(raw)


@pytest.mark.parametrize("resources,message", [
    ({"num_cpus": 1}, "num_cpus = 1 is too few: the tokenize job"),
    ({"num_cpus": 2, "segment": {"num_workers": 3}}, "num_cpus = 2 is too few: Stage 2 (segment workers"),
    ({"num_cpus": 3, "stage1": {"num_workers": 2, "resources_per_worker": {"CPU": 2}}}, "Stage 1 (stage1 workers"),
    ({"num_cpus": 4, "snapshot": {"num_actors": 2, "num_cpus": 2}}, None),
    ({"num_cpus": 2, "stage1": {"num_workers": 4, "use_gpu": True}}, None),  # GPU workers take no CPU
    ({"num_cpus": 2, "segment": {"num_workers": 4, "resources_per_worker": {"spot": 1}}}, None),  # nor custom ones
    ({"num_cpus": 1, "address": "ray://head:10001"}, None),  # num_cpus only sizes a local Ray
])
def test_local_ray_too_small_for_a_job_is_refused(resources, message, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    raw = {**MINIMAL, "resources": resources}
    if message is None:
        validate_config(raw)
    else:
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate_config(raw)


def test_snapshot_pool_and_shard_io_settings():
    """files_per_actor becomes Ray Data's concurrent calls per actor (never more actors than files need); the
    snapcheck I/O settings reach the storage's write options in bytes."""
    cfg = validate_config({**MINIMAL, "resources": {"snapshot": {"num_actors": 4, "num_cpus": 3, "files_per_actor": 3}},
                           "snapcheck": {"upload_part_mib": 8, "upload_concurrency": 2}})
    assert cfg.resources.snapshot.pool_options(7) == {"size": 3, "max_tasks_in_flight_per_actor": 3,
                                                      "max_concurrent_calls_per_actor": 3,
                                                      "enable_true_multi_threading": True}
    assert cfg.resources.snapshot.pool_options(100)["size"] == 4
    assert validate_config(MINIMAL).resources.snapshot.pool_options(5)["enable_true_multi_threading"] is False
    options = cfg.snapcheck.write_options()
    assert (options.upload_part_bytes, options.upload_concurrency) == (8 << 20, 2)


def test_shard_io_settings_do_not_make_another_run():
    """How shards are moved (threads, prefetch, upload parts) is not what a run computes; their layout is."""
    from segprop_ray.pipeline.prepare import semantic_config

    base = semantic_config(validate_config(MINIMAL))
    tuned = {"read_threads": 8, "prefetch_groups": 4, "upload_part_mib": 16, "upload_concurrency": 8}
    assert semantic_config(validate_config({**MINIMAL, "snapcheck": tuned})) == base
    assert semantic_config(validate_config({**MINIMAL, "snapcheck": {"rows_per_group": 8}})) != base
    assert "read_threads" not in base["snapcheck"] and "rows_per_group" in base["snapcheck"]
