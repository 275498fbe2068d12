"""``segprop submit`` through the Ray Jobs API of a token-authenticated local cluster, with learning rate 0:
the job succeeds and the exported model is the input model, logit for logit; a local run_dir is refused for a
cluster on another machine."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import one_line_error, run_cli
from pipeline_setup import logits, make_inputs, pipeline_config, write_config
from segprop_ray.cli import main
from segprop_ray.pipeline.submit import is_local_address
from segprop_ray.reporting.export import open_run


@pytest.mark.slow
def test_submit_lr0_run_exports_the_input_model(local_ray, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # the client must find the cluster's token by itself
    model, train, evaluation = make_inputs(tmp_path)
    run_dir = tmp_path / "run"
    raw = pipeline_config(str(run_dir), str(model), str(train), str(evaluation), training={"learning_rate": 0.0})
    config = write_config(tmp_path / "config.yaml", raw)

    code = main(["submit", str(config), "--address", local_ray.dashboard_url, "--python", sys.executable])

    output = capsys.readouterr().out
    assert code == 0, output[-3000:]
    assert "submitted job segprop-run-" in output
    _, manifest = open_run(str(run_dir))
    assert manifest.state == "done"
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "export" / f"exit-{manifest.final_depth}").eval()
    original = AutoModelForCausalLM.from_pretrained(model).eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(exported, ids), logits(original, ids), rtol=0, atol=0)


@pytest.mark.parametrize("run_dir", ["local", "file"])
def test_submit_refuses_a_local_run_dir_for_a_remote_cluster(tmp_path, capsys, run_dir):
    path = tmp_path / "run"
    run_dir = str(path) if run_dir == "local" else path.as_uri()
    config = write_config(tmp_path / "config.yaml", pipeline_config(run_dir, "model", "train.jsonl", "eval.jsonl"))

    code, _, err = run_cli(capsys, "submit", str(config), "--address", "http://10.1.2.3:8265")

    line = one_line_error(err)
    assert code == 2
    assert f"run_dir {run_dir} is a local path" in line and "use shared storage (run_dir: s3://...)" in line


@pytest.mark.parametrize("address,local", [
    ("http://127.0.0.1:8265", True), ("localhost:8265", True), ("http://[::1]:8265", True),
    ("http://head.example.com:8265", False), ("10.1.2.3:8265", False),
])
def test_local_addresses(address, local):
    assert is_local_address(address) is local


@pytest.mark.slow
def test_submit_refuses_while_the_cluster_runs_a_job_for_the_same_run_dir(local_ray, tmp_path, capsys):
    from ray.job_submission import JobSubmissionClient

    from segprop_ray.pipeline.submit import RUN_DIR_KEY

    run_dir = f"{(tmp_path / 'run').as_uri()}/"
    config = write_config(tmp_path / "config.yaml", pipeline_config(run_dir, "model", "train.jsonl", "eval.jsonl"))
    client = JobSubmissionClient(local_ray.dashboard_url)
    sleeper = f"{sys.executable} -c 'import time; time.sleep(300)'"
    running = submit_when_ready(client, entrypoint=sleeper, metadata={RUN_DIR_KEY: run_dir.rstrip("/")})
    other = submit_when_ready(client, entrypoint=sleeper, metadata={RUN_DIR_KEY: run_dir + "-other"})
    try:
        code, out, err = run_cli(capsys, "submit", str(config), "--address", local_ray.dashboard_url)
    finally:
        for job in (running, other):
            client.stop_job(job)

    line = one_line_error(err)
    assert code == 2 and "submitted" not in out
    assert f"already runs job {running} (" in line and f"for run_dir {run_dir}" in line and other not in line


def submit_when_ready(client, timeout_s: float = 120, **job) -> str:
    """``client.submit_job(**job)``, retried while a freshly started dashboard has no job agent yet."""
    import time

    deadline = time.time() + timeout_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.time() > deadline:
                raise
            time.sleep(1)
