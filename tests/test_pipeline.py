"""The Ray pipeline end to end on a local Ray (2 CPUs): file:// and s3:// (moto) run directories.

Every test here starts real Ray Data and Ray Train jobs, so they are marked slow; CI runs them too.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import upload
from pipeline_setup import (BASE_DEPTH, NUM_LAYERS, LAST_LAYERS, inprocess_reference, logits, make_inputs,
                            pipeline_config, reference_model)
from segprop_ray.config import validate_config
from segprop_ray.demo.corpus import generate_mc_items, write_mc_jsonl
from segprop_ray.pipeline.driver import Driver

pytestmark = pytest.mark.slow


def record_dropped_checkpoints(monkeypatch) -> dict[str, list[str]]:
    """{iteration's Ray Train run name: its checkpoint directories} as they were when the driver dropped them."""
    dropped: dict[str, list[str]] = {}
    drop = Driver._drop_checkpoints

    def recording(driver: Driver, name: str) -> None:
        layout = driver.setup.layout
        layout.fs.invalidate_cache()
        directory = layout.checkpoints_dir(name)
        found = layout.fs.glob(f"{directory}/step-*") if layout.fs.exists(directory) else []
        dropped[name] = sorted(path.rsplit("/", 1)[-1] for path in found)
        drop(driver, name)

    monkeypatch.setattr(Driver, "_drop_checkpoints", recording)
    return dropped


@pytest.mark.parametrize("storage", ["file", "s3"])
def test_pipeline_end_to_end_equals_inprocess_core(local_ray, tmp_path, request, monkeypatch, storage):
    model, train, evaluation = make_inputs(tmp_path)
    if storage == "s3":  # model, data and run directory all on the S3 server, reached through AWS_* variables
        bucket = request.getfixturevalue("s3_bucket")
        run_dir = f"s3://{bucket}/runs/e2e"
        model_uri = upload(model, f"s3://{bucket}/models/tiny")
        train_uri = upload(train.parent, f"s3://{bucket}/data") + "/train.jsonl"
        eval_uri = f"s3://{bucket}/data/eval.jsonl"
    else:
        run_dir, model_uri, train_uri, eval_uri = (tmp_path / "run").as_uri(), str(model), str(train), str(evaluation)
    mc_path = str(write_mc_jsonl(generate_mc_items(24, seed=5), tmp_path / "mc.jsonl"))
    cfg = validate_config(pipeline_config(run_dir, model_uri, train_uri, eval_uri,
                                          evaluation={"mc_path": mc_path, "nhsic_tokens": 64}))

    dropped = record_dropped_checkpoints(monkeypatch)

    manifest = Driver(cfg).run()

    middle = list(range(BASE_DEPTH + 1, NUM_LAYERS - LAST_LAYERS))
    assert manifest.state == "done" and manifest.committed_depths() == [BASE_DEPTH, *middle]
    assert manifest.final_depth == middle[-1] and manifest.decisions[-1]["reason"] == "last_layer"
    assert all(manifest.layer(d).files and manifest.layer(d).metrics["tokens"] > 0 for d in manifest.committed_depths())
    assert manifest.steps[f"export:{middle[-1]}"].status == "done"
    from segprop_ray.storage.layout import RunLayout
    layout = RunLayout.open(run_dir)
    # every iteration wrote Ray Train checkpoints (save_steps 2 of 6 steps), all dropped once it committed
    assert sorted(dropped) == sorted(f"{manifest.run_id}-depth{d}" for d in manifest.committed_depths())
    assert all(any(n.startswith("step-0000006-final-") for n in names) for names in dropped.values()), dropped
    assert not [p for p in layout.fs.glob(layout.checkpoints_dir() + "/*") if "-depth" in p]
    for depth in manifest.committed_depths():  # every exit scored beside training: accuracy and nHSIC
        metrics = manifest.layer(depth).metrics
        assert metrics["evaluated"] and metrics["n"] == 24 and 0 <= metrics["accuracy"] <= 1
        assert 0 < metrics["nhsic_input"] <= 1 and 0 < metrics["nhsic_label"] <= 1
    assert manifest.baseline["eval_loss"] > 0 and manifest.baseline["n"] == 24

    from segprop_ray.reporting.model_card import export_with_card
    from segprop_ray.reporting.report import write_report

    depth, _ = export_with_card(run_dir, str(tmp_path / "exported"), "final")
    assert f"the exit after layer {depth}" in (tmp_path / "exported" / "README.md").read_text()
    written = write_report(run_dir, str(tmp_path / "report"))
    assert (tmp_path / "report" / "metric_vs_depth.png").stat().st_size > 10_000 and "report.md" in written
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    assert exported.config.num_hidden_layers == depth + 1 + LAST_LAYERS
    generated = exported.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert generated.shape == (1, 7)

    blocks = {split: info["num_blocks"] for split, info in manifest.tokens.items()}
    result, eval_ids = inprocess_reference(cfg, model, layout, blocks)
    reference = reference_model(result, model, depth, tmp_path / "reference")
    torch.testing.assert_close(logits(exported, eval_ids[:4]), logits(reference, eval_ids[:4]), rtol=0, atol=0)
    assert [manifest.layer(d).eval_loss for d in manifest.committed_depths()] == [it["eval_loss"] for it in result.iterations]


def test_worker_killed_mid_iteration_resumes_from_checkpoint(local_ray, tmp_path, monkeypatch):
    """Rank 0 dies at step 5 of layer 1; Ray Train restarts it from the step-4 checkpoint, and the result is exact."""
    model, train, evaluation = make_inputs(tmp_path)
    run_dir = (tmp_path / "run").as_uri()
    cfg = validate_config(pipeline_config(run_dir, str(model), str(train), str(evaluation),
                                          training={"max_steps": 8, "save_steps": 2}))
    monkeypatch.setenv("SEGPROP_TEST_KILL_WORKER_AT", f"{BASE_DEPTH + 1}:5")

    manifest = Driver(cfg).run()

    record = manifest.layer(BASE_DEPTH + 1)
    assert record.status == "done" and record.steps == 8
    assert record.metrics["resumed_from_step"] == 4
    assert manifest.layer(BASE_DEPTH).metrics["resumed_from_step"] is None  # Stage 1 ran once, undisturbed
    from segprop_ray.storage.layout import RunLayout
    blocks = {split: info["num_blocks"] for split, info in manifest.tokens.items()}
    result, _ = inprocess_reference(cfg, model, RunLayout.open(run_dir), blocks)
    assert record.eval_loss == result.iterations[-1]["eval_loss"]
    assert record.history == result.iterations[-1]["history"]


def test_failed_snapshot_job_keeps_finished_files(local_ray, tmp_path, monkeypatch):
    """S[0]'s job dies on its first eval file; the next attempt keeps every file recorded as finished (all of
    train; eval files the actor finished before the failure stopped the job, if any), writes only the others,
    and the depth it commits is byte for byte the depth a job from scratch writes (two files at once per actor,
    its rate per actor in the step's outputs)."""
    from segprop_ray.storage.layout import RunLayout
    from segprop_ray.storage.snapcheck import delete_depth

    model, train, evaluation = make_inputs(tmp_path)
    run_dir = tmp_path / "run"
    cfg = validate_config(pipeline_config(run_dir.as_uri(), str(model), str(train), str(evaluation)))
    monkeypatch.setenv("SEGPROP_TEST_FAIL_SNAPSHOT_AT", f"{BASE_DEPTH}:eval:0")

    with pytest.raises(Exception, match="SEGPROP_TEST_FAIL_SNAPSHOT_AT"):
        Driver(cfg).run()  # tokenize, Stage 1, then S[0] fails on its first eval file
    from segprop_ray.storage.manifest import ManifestStore
    failed = ManifestStore(RunLayout.open(run_dir.as_uri())).read()
    step = failed.steps[f"snapshot:{BASE_DEPTH}"]
    assert failed.state == "failed" and step.status == "failed"  # not left "running" for status --watch
    assert "SEGPROP_TEST_FAIL_SNAPSHOT_AT" in failed.error and "\n" not in failed.error and step.error == failed.error
    dirs = {split: run_dir / "snapshots" / split / f"depth={BASE_DEPTH}" for split in ("train", "eval")}
    assert not any((d / "_COMMITTED").exists() for d in dirs.values())
    recorded = {split: sorted(p.stem for p in (d / "_written").glob("*.json")) for split, d in dirs.items()}
    assert recorded["train"] == sorted(p.stem for p in dirs["train"].glob("part-*.parquet"))  # train came first
    assert recorded["train"] and "part-00000" not in recorded["eval"]
    before = {(split, name): (dirs[split] / f"{name}.parquet").stat().st_mtime_ns
              for split, names in recorded.items() for name in names}

    monkeypatch.delenv("SEGPROP_TEST_FAIL_SNAPSHOT_AT")
    driver = Driver(cfg)
    driver.prepare()
    driver.ensure_snapshot(BASE_DEPTH)

    outputs = driver.manifest.steps[f"snapshot:{BASE_DEPTH}"].outputs
    assert outputs["kept_files"] == {split: len(names) for split, names in recorded.items()}
    assert {key: (dirs[key[0]] / f"{key[1]}.parquet").stat().st_mtime_ns for key in before} == before
    assert not any((d / "_written").exists() for d in dirs.values())
    resumed = {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.glob("snapshots/*/depth=*/part-*"))}

    layout = RunLayout.open(run_dir.as_uri())
    for split in ("train", "eval"):
        delete_depth(layout, split, BASE_DEPTH)
    two_at_once = validate_config(pipeline_config(run_dir.as_uri(), str(model), str(train), str(evaluation),
                                                  resources={"snapshot": {"files_per_actor": 2, "num_cpus": 2}}))
    fresh = Driver(two_at_once)  # the same depth again, two files at once through one actor
    fresh.prepare()
    fresh.ensure_snapshot(BASE_DEPTH)
    outputs = fresh.manifest.steps[f"snapshot:{BASE_DEPTH}"].outputs
    assert outputs["kept_files"] == {"train": 0, "eval": 0}
    assert (outputs["actors"], outputs["files_per_actor"]) == (1, 2) and outputs["bytes_per_s_per_actor"] > 0
    scratch = {p.relative_to(run_dir): p.read_bytes() for p in sorted(run_dir.glob("snapshots/*/depth=*/part-*"))}
    assert resumed.keys() == scratch.keys() and len(resumed) > len(before)
    assert all(resumed[name] == scratch[name] for name in scratch)


# Two data-parallel ranks and one process on both ranks' batches differ only in how the gradient is summed: DDP's
# all-reduce adds the two ranks' float32 gradients (each the mean over its own 4 blocks) and halves the sum, one
# process takes the mean over the 8 blocks in one backward pass. The float additions run in other orders, so the
# weights differ in their last bits: at most 8.3e-7 (Stage 1) and 7.0e-7 (Stage 2) after 4 AdamW steps here, 12x
# below atol. Training moves the weights by ~1e-2, so a rank that reads other rows is far outside the tolerance.
DATA_PARALLEL_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def stored_weights(run_dir, record) -> dict[str, torch.Tensor]:
    """Every tensor an iteration committed: its layer file(s) and its exit, by original name."""
    from segprop_ray.core.weights import load_tensors

    return {name: tensor for path in record.files for name, tensor in load_tensors(run_dir / path).items()}


def both_ranks(orders, rows: dict[str, torch.Tensor]):
    """A batch source whose micro-batch i is rank 0's micro-batch i followed by rank 1's, of ``rows`` (by block id)."""
    def batches(epoch: int, skip: int):
        pairs = list(zip(*(order.epoch_batches(epoch) for order in orders)))[skip:]
        return ({key: value[torch.tensor(a + b)] for key, value in rows.items()} for a, b in pairs)

    return batches


def one_process_on_both_ranks(cfg, model_dir, depth: int, rows: dict[str, torch.Tensor],
                              exits: dict[int, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The iteration of ``depth`` trained in this process on both ranks' micro-batches at once, starting from the
    input model and the given earlier exits (a Stage 2 layer's head): its committed and exit tensors."""
    from segprop_ray.core.data_order import BlockOrder
    from segprop_ray.core.exits import IterationExit
    from segprop_ray.core.iteration import RunWeights, build_segment, split_trained
    from segprop_ray.core.parts import ModelParts
    from segprop_ray.core.plan import SegPropPlan, segment_seed
    from segprop_ray.core.training import LoopHooks, SegmentLoop
    from segprop_ray.core.weights import DictSource, SafetensorsSource
    from transformers import AutoConfig

    parts = ModelParts(AutoConfig.from_pretrained(model_dir))
    plan = SegPropPlan.from_config(cfg.segprop, parts.num_layers)
    args = cfg.training_for(plan.stage_of(depth))
    orders = [BlockOrder(len(rows["input_ids"]), cfg.snapcheck.rows_per_group, args.per_device_train_batch_size,
                         args.seed, cfg.data.shuffle, 2, rank) for rank in (0, 1)]
    torch.manual_seed(segment_seed(args.seed, depth))
    weights = RunWeights(plan, SafetensorsSource.from_model_dir(model_dir), DictSource({}),
                         lambda d: DictSource(exits[d]), cfg.segprop.ll_baseline)
    segment = build_segment(parts, weights.training_spec(depth), trainable=True, loss_chunk_tokens=args.loss_chunk_tokens)
    SegmentLoop(segment, args, both_ranks(orders, rows), orders[0].batches_per_epoch(), torch.device("cpu"),
                IterationExit.from_config(cfg.exit.layer, args), LoopHooks()).run()
    committed, exit_weights = split_trained(segment, parts, plan)
    return {**committed, **exit_weights}


def assert_same_weights(stored: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """The same tensor names, every tensor within the data-parallel tolerance."""
    assert sorted(stored) == sorted(reference)
    for name, tensor in reference.items():
        torch.testing.assert_close(stored[name], tensor, **DATA_PARALLEL_TOLERANCE,
                                   msg=lambda message, name=name: f"{name}: {message}")


def snapshot_rows(layout, depth: int, num_blocks: int) -> dict[str, torch.Tensor]:
    """Every train row of the committed snapshot S[depth], in block-id order: token ids and activations."""
    from segprop_ray.storage.reader import sequential_reader
    from segprop_ray.storage.snapcheck import load_committed

    marker = load_committed(layout, "train", depth, None, num_blocks)
    (rows,) = list(sequential_reader(layout, marker, batch_size=num_blocks))
    assert torch.equal(rows["block_id"], torch.arange(num_blocks))
    return {"input_ids": rows["input_ids"], "hidden": rows["hidden"]}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_data_parallel_workers_train_as_one_batch_of_both(local_ray, tmp_path, strategy):
    """Stage 1 on 2 data-parallel workers (DDP or FSDP, gloo) equals one process training on both ranks' batches
    at once. Gradient clipping is on: under FSDP it must use the norm of the whole gradient, not of a shard.
    The DDP case runs the whole pipeline: Stage 2's layer also trains on 2 workers, each reading its rows of the
    snapshot shards, and its committed layer and exit equal one process's on both ranks' snapshot rows."""
    from segprop_ray.core.weights import load_tensors
    from segprop_ray.storage.layout import RunLayout
    from segprop_ray.storage.shard_format import ShardSpec
    from segprop_ray.storage.shards import read_token_shards
    from segprop_ray.storage.weights_store import exit_file
    from transformers import AutoConfig

    model, train, evaluation = make_inputs(tmp_path)
    run_dir = tmp_path / "run"
    workers = {"num_workers": 2, "strategy": strategy}
    resources = {"stage1": workers, "segment": workers} if strategy == "ddp" else {"stage1": workers}
    cfg = validate_config(pipeline_config(str(run_dir), str(model), str(train), str(evaluation),
                                          training={"max_steps": 4, "max_grad_norm": 0.05}, resources=resources))
    driver = Driver(cfg)
    if strategy == "ddp":  # the whole run: Stage 2 also trains on 2 workers, each reading its part of the shards
        driver.run()
    else:  # Stage 1 only
        driver.prepare()
        driver.tokenize()
        driver.train_depth(BASE_DEPTH)
    manifest = driver.manifest
    metrics = manifest.layer(BASE_DEPTH).metrics
    assert metrics["world_size"] == 2
    assert metrics["data_parallel"] == {"ddp": "DistributedDataParallel", "fsdp": "FullyShardedDataParallel"}[strategy]

    layout, num_blocks = RunLayout.open(str(run_dir)), manifest.tokens["train"]["num_blocks"]
    hidden_size = AutoConfig.from_pretrained(model).hidden_size
    spec = ShardSpec.for_snapcheck(cfg.data.seq_len, hidden_size, "bf16", cfg.snapcheck.rows_per_group, 2)
    ids = read_token_shards(layout, "train", spec, num_blocks)
    stage1 = stored_weights(run_dir, manifest.layer(BASE_DEPTH))
    assert_same_weights(stage1, one_process_on_both_ranks(cfg, model, BASE_DEPTH, {"input_ids": ids}, {}))
    if strategy == "ddp":
        middle = manifest.layer(BASE_DEPTH + 1)
        assert middle.status == "done" and middle.metrics["world_size"] == 2
        assert middle.metrics["data_parallel"] == "DistributedDataParallel"
        rows = snapshot_rows(layout, BASE_DEPTH, num_blocks)
        assert torch.equal(rows["input_ids"], ids)
        head = load_tensors(run_dir / exit_file(BASE_DEPTH))  # exit 0: the LM head Stage 2 starts from
        reference = one_process_on_both_ranks(cfg, model, BASE_DEPTH + 1, rows, {BASE_DEPTH: head})
        assert_same_weights(stored_weights(run_dir, middle), reference)


def test_driver_killed_while_tokenizing_continues_at_the_saved_input_file(local_ray, tmp_path, monkeypatch):
    """The corpus in 4 files; the tokenize job fails on reaching the third. The next driver reads only files 2-3,
    commits exactly the token files of an uninterrupted job and removes the saved position."""
    from segprop_ray.pipeline import token_packing
    from segprop_ray.storage.layout import RunLayout

    model, train, evaluation = make_inputs(tmp_path)
    lines = train.read_text().splitlines(keepends=True)
    parts = [tmp_path / "data" / f"train-{i}.jsonl" for i in range(4)]
    for i, part in enumerate(parts):
        part.write_text("".join(lines[i::4]))
    configs = {name: validate_config(pipeline_config((tmp_path / name).as_uri(), str(model), [str(p) for p in parts],
                                                     str(evaluation))) for name in ("killed", "whole")}
    monkeypatch.setattr(token_packing, "SAVE_EVERY_S", 0.0)
    monkeypatch.setenv(token_packing.FAIL_ENV, "train:2")
    driver = Driver(configs["killed"])
    driver.prepare()
    with pytest.raises(RuntimeError, match=token_packing.FAIL_ENV):
        driver.tokenize()
    assert (tmp_path / "killed" / "tokens" / "_resume" / "state.json").exists()
    monkeypatch.delenv(token_packing.FAIL_ENV)

    from segprop_ray.pipeline import tokenize_job
    read_records, starts = tokenize_job.read_records, []

    def recording_read(files, *args):
        starts.append(files[0])
        return read_records(files, *args)

    monkeypatch.setattr(tokenize_job, "read_records", recording_read)
    for name in ("killed", "whole"):
        driver = Driver(configs[name])
        driver.prepare()
        driver.tokenize()
    assert starts == [str(parts[2]), str(evaluation), str(parts[0]), str(evaluation)]  # resumed: train 2-3, eval; whole
    assert not (tmp_path / "killed" / "tokens" / "_resume").exists()
    written = {name: {p.relative_to(tmp_path / name): p.read_bytes() for p in sorted((tmp_path / name).glob("tokens/*/*"))}
               for name in ("killed", "whole")}
    assert written["killed"] == written["whole"] and len(written["whole"]) > 4
    layout = RunLayout.open((tmp_path / "killed").as_uri())
    assert layout.fs.exists(layout.commit_marker("train", None))
