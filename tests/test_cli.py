"""What a user sees from the command before any Ray work: one-line errors, refusals, status output."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import one_line_error, run_cli
from pipeline_setup import make_inputs, pipeline_config, write_config
from segprop_ray.config import validate_config
from segprop_ray.pipeline.driver import Driver
from segprop_ray.pipeline.prepare import RunConflict


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.mark.parametrize("override,message", [
    ("segprop.base_depth=1", "leaves no middle layer in a 4-layer model"),
    ("segprop.last_layers=-1", "segprop.last_layers: Input should be greater than or equal to 0"),
    ("segprop.unknown=1", "unknown key 'segprop.unknown'"),
    ("model=/no/such/model", "model directory not found: /no/such/model"),
    ("data.train=/no/such/file.jsonl", "data.train '/no/such/file.jsonl' matches no file"),
    ("evaluation.mc_path=/no/such/mc.jsonl", "evaluation.mc_path '/no/such/mc.jsonl' matches no file"),
    ("data.text_field=body", "train.jsonl line 1: no 'body' field (it has: text); set data.text_field"),
])
def test_bad_input_fails_fast_with_one_line(tmp_path, capsys, inputs, override, message):
    model, train, evaluation = inputs
    config = write_config(tmp_path / "c.yaml", pipeline_config(str(tmp_path / "run"), str(model), str(train), str(evaluation)))
    started = time.time()
    code, _, err = run_cli(capsys, "run", str(config), "--set", override)
    assert code == 2 and message in one_line_error(err)
    assert time.time() - started < 30 and not (tmp_path / "run" / "manifest.json").exists()


def test_unreachable_bucket_is_named(tmp_path, capsys, inputs, s3_env):
    model, train, evaluation = inputs
    config = write_config(tmp_path / "c.yaml", pipeline_config("s3://no-such-bucket-here/run", str(model), str(train), str(evaluation)))
    code, _, err = run_cli(capsys, "run", str(config))
    line = one_line_error(err)
    assert code == 2 and "s3://no-such-bucket-here/run" in line and "not writable" in line
    assert "testing" not in line  # no credential in the message


def test_other_config_on_existing_run_is_refused_unless_restart(tmp_path, inputs):
    model, train, evaluation = inputs
    raw = pipeline_config(str(tmp_path / "run"), str(model), str(train), str(evaluation))
    Driver(validate_config(raw)).prepare()
    marker = tmp_path / "run" / "layers" / "kept.txt"
    marker.parent.mkdir(parents=True)
    marker.write_text("committed work")
    changed = validate_config({**raw, "training": {**raw["training"], "learning_rate": 0.5}})
    with pytest.raises(RunConflict, match=r"config differs in: training\.learning_rate\); pass --restart"):
        Driver(changed).prepare()
    assert marker.exists()  # nothing written is lost by a refusal
    same_where = validate_config({**raw, "resources": {"num_cpus": 3}})
    Driver(same_where).prepare()  # where/how fast it runs is not what it computes: continues the run
    smaller_chunks = validate_config({**raw, "training": {**raw["training"], "loss_chunk_tokens": 64}})
    Driver(smaller_chunks).prepare()  # e.g. after an out-of-memory error: continues the run
    assert marker.exists()
    Driver(changed, restart=True).prepare()
    assert not marker.exists()


def test_status_of_a_prepared_run(tmp_path, capsys, inputs):
    model, train, evaluation = inputs
    run_dir = str(tmp_path / "run")
    Driver(validate_config(pipeline_config(run_dir, str(model), str(train), str(evaluation)))).prepare()
    code, out, _ = run_cli(capsys, "status", run_dir)
    assert code == 0 and "state: running" in out and "mode: segprop" in out
    code, out, _ = run_cli(capsys, "status", run_dir, "--json")
    status = json.loads(out)
    assert code == 0 and status["state"] == "running" and status["layers"] == []
    code, _, err = run_cli(capsys, "status", str(tmp_path / "nothing"))
    assert code == 2 and "holds no segprop run" in one_line_error(err)
    code, _, err = run_cli(capsys, "export", run_dir, "--depth", "3", "--out", str(tmp_path / "x"))
    assert code == 2 and "exit 3 is not committed" in one_line_error(err)


def test_console_script_is_installed():
    """The ``segprop`` entry point pip installed beside this interpreter (the one ``make run`` calls)."""
    script = Path(sys.executable).parent / "segprop"
    assert script.is_file(), f"{script} is missing: reinstall the package (make venv)"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: segprop ")
    for command in ("run", "status", "export", "submit", "report", "compare", "demo"):
        assert f"    {command} " in out.stdout, command
    out = subprocess.run([str(script), "status", "/no/such/run"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "holds no segprop run" in one_line_error(out.stderr)  # main()'s exit code


def test_status_shows_a_running_iterations_progress(tmp_path, capsys, inputs):
    from segprop_ray.storage.manifest import LayerRecord, ManifestStore

    model, train, evaluation = inputs
    run_dir = str(tmp_path / "run")
    driver = Driver(validate_config(pipeline_config(run_dir, str(model), str(train), str(evaluation))))
    setup = driver.prepare()
    store = ManifestStore(setup.layout)
    manifest = setup.manifest
    manifest.layers["1"] = LayerRecord(depth=1, stage="stage2", status="running")
    store.update(manifest, lambda m: m.record_progress(1, {"step": 7, "total": 40, "train_loss": 2.5}))
    code, out, _ = run_cli(capsys, "status", run_dir)
    assert code == 0 and "7/40" in out and "2.5000" in out


def test_status_shows_running_jobs_files(tmp_path, capsys, inputs):
    from segprop_ray.storage.manifest import ManifestStore

    model, train, evaluation = inputs
    run_dir = str(tmp_path / "run")
    setup = Driver(validate_config(pipeline_config(run_dir, str(model), str(train), str(evaluation)))).prepare()

    def running(m):
        step = m.step("snapshot:2")
        step.status, step.started = "running", "2026-11-28T10:00:00Z"
        step.outputs = {"files_done": {"train": 3, "eval": 0}, "files_total": {"train": 9, "eval": 1}}
        step = m.step("tokenize")
        step.status, step.started = "running", "2026-11-28T09:00:00Z"
        step.outputs = {"files_done": {"train": 2}, "files_total": {"train": 4}}

    ManifestStore(setup.layout).update(setup.manifest, running)
    code, out, _ = run_cli(capsys, "status", run_dir)
    assert code == 0 and "running: snapshot:2 since 2026-11-28T10:00:00Z: eval 0/1 files, train 3/9 files" in out
    assert "tokenize since 2026-11-28T09:00:00Z: train 2/4 input files" in out


@pytest.mark.slow
def test_resumed_driver_rehashes_shards_it_did_not_write(local_ray, tmp_path, inputs):
    """A token shard corrupted in place (same size) is found by the next driver and regenerated, not read (the
    hashes are computed by Ray tasks, hence the session's Ray)."""
    from segprop_ray.storage.shards import write_token_shards
    from segprop_ray.storage.snapcheck import commit_depth
    from helpers import corpus_blocks

    model, train, evaluation = inputs
    cfg = validate_config(pipeline_config(str(tmp_path / "run"), str(model), str(train), str(evaluation)))
    driver = Driver(cfg)
    setup = driver.prepare()
    blocks = {"train": 12, "eval": 4}
    for split, count in blocks.items():
        infos = write_token_shards(setup.layout, split, corpus_blocks(count, 32), setup.spec)
        commit_depth(setup.layout, split, None, infos, setup.tokens_hash, setup.spec)
    driver.store.update(driver.manifest, lambda m: setattr(m, "tokens", {s: {"num_blocks": n} for s, n in blocks.items()}))
    assert Driver(cfg).prepare() and _committed_after_restart(cfg, "train")
    shard = tmp_path / "run" / "tokens" / "train" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert not _committed_after_restart(cfg, "train")
    assert _committed_after_restart(cfg, "eval")


def _committed_after_restart(cfg, split: str) -> bool:
    driver = Driver(cfg)
    driver.prepare()
    driver.echo = lambda text: None
    return driver._committed(split, None)


RAY_DATA_ADVICE = ("Failed to apply UDF transform after 1/1 attempts (total backoff 0.0s).\n"
                   "To change retry attempts, backoff, or which errors are retried, configure "
                   "`ray.data.DataContext.get_current()` if you believe this to be transient.")


def _ray_data_failure() -> Exception:
    """What ``ray.get`` raises for a Ray Data UDF's KeyError: the remote ``__cause__`` is lost in pickling,
    only the traceback text keeps it, and the wrapper's text ends with Ray's retry advice."""
    import traceback

    from ray.exceptions import RayTaskError, UserCodeException

    try:
        try:
            {}["text"]
        except KeyError as inner:
            raise UserCodeException("UDF failed to process a data block.") from inner
    except UserCodeException:
        remote_traceback = traceback.format_exc() + RAY_DATA_ADVICE
    cause = UserCodeException(f"UDF failed to process a data block.\n{RAY_DATA_ADVICE}")
    error = RayTaskError("MapWorker.submit", remote_traceback, cause, proctitle="ray::MapWorker", pid=1, ip="127.0.0.1")
    return error.as_instanceof_cause()


def _train_failure() -> Exception:
    from ray.train.v2.api.exceptions import WorkerGroupError

    return WorkerGroupError(f"[Rank 0]\nTraceback ...\nKeyError: 'text'\n{RAY_DATA_ADVICE}",
                            {1: RuntimeError("rank 1 stopped"), 0: KeyError(f"text\n{RAY_DATA_ADVICE}")})


def _chained_failure() -> Exception:
    try:
        raise OSError(f"disk full\n{RAY_DATA_ADVICE}")
    except OSError as inner:
        try:
            raise RuntimeError(f"the job failed\n{RAY_DATA_ADVICE}") from inner
        except RuntimeError as outer:
            return outer


@pytest.mark.parametrize("make_error,expected", [
    (_ray_data_failure, "segprop: failed: KeyError: 'text'"),
    (_train_failure, "segprop: failed: KeyError: 'text'"),
    (_chained_failure, "segprop: failed: OSError: disk full"),
])
def test_failure_inside_ray_is_reported_by_its_cause(capsys, monkeypatch, make_error, expected):
    import segprop_ray.cli as cli

    error = make_error()

    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_status", fail)
    code, _, err = run_cli(capsys, "status", "/no/run")
    assert code == 1 and one_line_error(err) == expected


def test_export_depth_is_validated_before_the_run_is_read(tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", str(tmp_path / "nothing"), "--depth", "foo", "--out", str(tmp_path / "x"))
    line = one_line_error(err)
    assert code == 2 and "depth 'foo' is not valid" in line and "'best' or 'final'" in line


def test_status_report_export_take_storage_options(tmp_path, capsys, monkeypatch, inputs, s3_bucket, s3_env):
    """A run on an S3 endpoint given only through --storage-option (no AWS endpoint or keys in the environment)."""
    import s3fs

    model, train, evaluation = inputs
    run_dir = f"s3://{s3_bucket}/run"
    Driver(validate_config(pipeline_config(run_dir, str(model), str(train), str(evaluation)))).prepare()
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    s3fs.S3FileSystem.clear_instance_cache()
    options = ["--storage-option", f"endpoint_url={s3_env}", "--storage-option", "key=testing",
               "--storage-option", "secret='testing'"]
    code, out, _ = run_cli(capsys, "status", run_dir, "--json", *options)
    assert code == 0 and json.loads(out)["state"] == "running"
    code, out, _ = run_cli(capsys, "report", run_dir, "--out", str(tmp_path / "report"), *options)
    assert code == 0 and (tmp_path / "report" / "report.md").is_file()
    code, _, err = run_cli(capsys, "export", run_dir, "--depth", "1", "--out", str(tmp_path / "x"), *options)
    assert code == 2 and "exit 1 is not committed" in one_line_error(err)  # the run was read
    code, _, err = run_cli(capsys, "status", run_dir, "--storage-option", "endpoint_url")
    assert code == 2 and "expected KEY=VALUE" in one_line_error(err)


def test_status_hints_at_a_quiet_running_run(tmp_path, capsys, inputs):
    """A driver killed with SIGKILL leaves its run "running": after 10 quiet minutes status says what to do."""
    import datetime

    from segprop_ray.storage.manifest import MANIFEST_FORMAT

    model, train, evaluation = inputs
    run_dir = str(tmp_path / "run")
    setup = Driver(validate_config(pipeline_config(run_dir, str(model), str(train), str(evaluation)))).prepare()
    code, out, _ = run_cli(capsys, "status", run_dir)
    assert code == 0 and "state: running " in out and "no update" not in out  # just written

    body = setup.manifest.model_dump(mode="json")
    body["updated"] = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=30)).isoformat()
    MANIFEST_FORMAT.write(setup.layout.fs, setup.layout.manifest, body)
    code, out, _ = run_cli(capsys, "status", run_dir)
    assert code == 0 and "state: running " in out
    assert "\nno update for 30 min: if no driver is running any more, run the same command again to continue" in out


def test_eval_data_without_the_text_field_is_named_before_tokenizing(tmp_path, capsys, inputs):
    model, train, _ = inputs
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text('{"body": "held-out text"}\n')
    config = write_config(tmp_path / "c.yaml", pipeline_config(str(tmp_path / "run"), str(model), str(train),
                                                               str(evaluation)))
    code, _, err = run_cli(capsys, "run", str(config))
    assert code == 2 and f"{evaluation} line 1: no 'text' field (it has: body); set data.text_field" in one_line_error(err)
    assert not (tmp_path / "run" / "manifest.json").exists()
