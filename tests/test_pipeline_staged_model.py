"""Once the input model is staged into the run directory, every reader (the data check, the plan, the tokenize job)
reads the staged copy: a run goes on with its origin gone, and makes the tokens a run from the origin makes."""

from __future__ import annotations

import json

import pytest

from helpers import tiny_model_dir
from pipeline_setup import pipeline_config
from segprop_ray.config import validate_config
from segprop_ray.demo.corpus import generate_instructions, write_records
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.model_stage import stage_model


def staged_config(tmp_path, run_uri: str, model, **data):
    """A prompt_completion config (its data check loads the tokenizer) that stages its model."""
    records = write_records(generate_instructions(24), tmp_path / "train.jsonl")
    raw = pipeline_config(run_uri, str(model), str(records), str(records), data={"format": "prompt_completion", **data},
                          resources={"stage_model": "always"})
    return validate_config(raw)


def test_a_resumed_run_reads_the_staged_copy_not_the_origin(tmp_path, run_uri):
    from segprop_ray.pipeline.prepare import prepare_run
    from segprop_ray.pipeline.stage_job import staged_source

    model = tiny_model_dir(tmp_path)
    cfg = staged_config(tmp_path, run_uri, model)
    layout = RunLayout.open(cfg.run_dir, cfg.storage_options)
    assert staged_source(cfg, layout) == ""  # nothing staged yet: the origin is read
    body = stage_model(str(model), layout)
    model.rename(tmp_path / "moved-away")  # the origin is gone after staging

    assert staged_source(cfg, layout) == body["uri"]
    setup = prepare_run(cfg)  # the data check's tokenizer and the plan's config come from the staged copy
    try:
        assert setup.model_info.num_layers == 6 and setup.model_info.uri == str(model)
    finally:
        setup.lease.release()


def test_without_the_staged_copy_the_gone_origin_is_named(tmp_path, run_uri):
    from segprop_ray.pipeline.prepare import prepare_run

    model = tiny_model_dir(tmp_path)
    cfg = staged_config(tmp_path, run_uri, model)
    model.rename(tmp_path / "moved-away")
    with pytest.raises(StorageError, match="model directory not found"):
        prepare_run(cfg)


@pytest.mark.slow
def test_the_tokenize_job_reads_the_staged_tokenizer(local_ray, tmp_path, s3_bucket):
    """Tokens from the staged copy (on S3, through the node cache) with the origin gone equal a run's from the origin."""
    from segprop_ray.pipeline.context import JobContext
    from segprop_ray.pipeline.tokenize_job import tokenize_and_pack
    from segprop_ray.storage.shard_format import ShardSpec

    model = tiny_model_dir(tmp_path)
    spec = ShardSpec.for_snapcheck(32, 32, "bfloat16", 4, 2)

    def tokens(run_uri: str, model_source: str) -> list:
        cfg = staged_config(tmp_path, run_uri, model)
        ctx = JobContext(cfg.model_dump(mode="json"), -1, 4, {}, model_source=model_source)
        splits, _ = tokenize_and_pack(ctx, spec, "tokens-hash")
        return [(split, [(f.rows, f.sha256) for f in s.files]) for split, s in sorted(splits.items())]

    from_origin = tokens(str(tmp_path / "plain-run"), "")
    staged_run = f"s3://{s3_bucket}/run"
    body = stage_model(str(model), RunLayout.open(staged_run))
    model.rename(tmp_path / "moved-away")

    assert tokens(staged_run, body["uri"]) == from_origin and from_origin[0][1]


def test_a_staged_copy_of_another_shape_than_planned_is_refused(tmp_path, run_uri):
    from segprop_ray.pipeline.stage_job import check_same_model
    from segprop_ray.storage.manifest import ModelInfo

    model = tiny_model_dir(tmp_path)
    body = stage_model(str(model), RunLayout.open(run_uri))
    planned = dict(uri=str(model), architecture="LlamaForCausalLM", family="llama", hidden_size=32, tied_embeddings=False,
                   untied=False)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    check_same_model(ModelInfo(num_layers=6, vocab_size=vocab, **planned), body["uri"], {})
    with pytest.raises(StorageError, match="changed at its origin while the run started"):
        check_same_model(ModelInfo(num_layers=4, vocab_size=vocab, **planned), body["uri"], {})
