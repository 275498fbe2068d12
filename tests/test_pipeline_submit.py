"""``segprop submit`` through the Ray Jobs API, as a user runs it: a client process of its own against a Ray head
started by ``ray start``, with token authentication on (the client finds the token file by itself and the
learning-rate-0 job exports the input model, logit for logit; a client without a token is refused) and off (a
client without a token submits). A local run_dir is refused for a cluster on another machine.

Each client reports the authentication mode Ray's Jobs client used in that process: ``RAY_AUTH_MODE`` as the
client left it, and whether Ray's HTTP client attaches a token. Ray reads the mode once per process, on import,
so only a fresh process per case shows it. ``HOME`` is a directory of the test's own: the host's
``~/.ray/auth_token`` never decides a case, and is never read or written.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import one_line_error, run_cli
from pipeline_setup import logits, make_inputs, pipeline_config, write_config
from ray_cluster import child_environment, cluster_process
from segprop_ray.pipeline.submit import is_local_address
from segprop_ray.reporting.export import open_run

TOKEN = "0123456789abcdef" * 4
CLIENT_MAIN = """
import os
import sys

from segprop_ray.cli import main

code = main(sys.argv[1:])
from ray._private.authentication.authentication_utils import is_token_auth_enabled  # what the Jobs client asks

mode = os.environ.get("RAY_AUTH_MODE", "unset")
print(f"client auth: RAY_AUTH_MODE={mode} ray={'token' if is_token_auth_enabled() else 'disabled'}")
sys.exit(code)
"""


@pytest.fixture(scope="module")
def token_home(tmp_path_factory):
    """A home directory holding ``.ray/auth_token``, as ``ray.init`` leaves it (shared by cluster and client)."""
    home = tmp_path_factory.mktemp("token-home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(TOKEN)
    return home


@pytest.fixture(scope="module")
def token_cluster(token_home, tmp_path_factory):
    """A local cluster with token authentication on, its token from ``token_home``'s file."""
    log = tmp_path_factory.mktemp("token-cluster") / "cluster.log"
    with cluster_process(child_environment(token_home, RAY_AUTH_MODE="token"), log) as url:
        yield url


def submit(home, *args: str) -> tuple[int, str, str]:
    """``segprop submit ARGS`` in a fresh client process with ``HOME=home`` and no Ray variable:
    (exit code, output, the client's auth line)."""
    env = child_environment(home)
    done = subprocess.run([sys.executable, "-c", CLIENT_MAIN, "submit", *args], env=env, capture_output=True,
                          text=True, timeout=400)
    auth = [line for line in done.stdout.splitlines() if line.startswith("client auth: ")]
    assert len(auth) == 1, done.stdout[-3000:] + done.stderr[-3000:]
    return done.returncode, done.stdout + done.stderr, auth[0]


def lr0_config(tmp_path):
    """(config path, model dir, run dir) of a learning-rate-0 run on the tiny inputs."""
    model, train, evaluation = make_inputs(tmp_path)
    run_dir = tmp_path / "run"
    raw = pipeline_config(str(run_dir), str(model), str(train), str(evaluation), training={"learning_rate": 0.0})
    return write_config(tmp_path / "config.yaml", raw), model, run_dir


def assert_exports_the_input_model(run_dir, model) -> None:
    """The run is done and its final export gives the input model's logits exactly."""
    _, manifest = open_run(str(run_dir))
    assert manifest.state == "done"
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "export" / f"exit-{manifest.final_depth}").eval()
    original = AutoModelForCausalLM.from_pretrained(model).eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(exported, ids), logits(original, ids), rtol=0, atol=0)


def http_status(url: str) -> int:
    """The HTTP status of a GET without any credentials."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.mark.slow
def test_submit_to_a_token_cluster_finds_the_token_file(token_cluster, token_home, tmp_path):
    assert http_status(f"{token_cluster}/api/jobs/") == 401  # the cluster refuses a request without the token
    config, model, run_dir = lr0_config(tmp_path)

    code, output, auth = submit(token_home, str(config), "--address", token_cluster, "--python", sys.executable)

    assert code == 0, output[-3000:]
    assert auth == "client auth: RAY_AUTH_MODE=token ray=token"  # turned on by the client, from ~/.ray/auth_token
    assert "submitted job segprop-run-" in output
    assert_exports_the_input_model(run_dir, model)


@pytest.mark.slow
def test_submit_without_a_token_is_refused_by_a_token_cluster(token_cluster, tmp_path):
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    config, _, run_dir = lr0_config(tmp_path)

    code, output, auth = submit(empty_home, str(config), "--address", token_cluster, "--python", sys.executable)

    assert auth == "client auth: RAY_AUTH_MODE=unset ray=disabled"
    lines = [line for line in output.splitlines() if line.startswith("segprop: ")]
    assert code == 1 and len(lines) == 1 and "Authentication required" in lines[0], output[-3000:]
    assert "submitted job" not in output and not run_dir.exists()


@pytest.mark.slow
def test_submit_to_a_cluster_without_auth_needs_no_token(tmp_path):
    """The job is only submitted (``--no-wait``): the whole run through the Jobs API is the token case's."""
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    config, _, _ = lr0_config(tmp_path)
    cluster_env = child_environment(empty_home, RAY_AUTH_MODE="disabled")

    with cluster_process(cluster_env, tmp_path / "cluster.log") as url:
        assert http_status(f"{url}/api/jobs/") == 200  # no authentication on this cluster
        code, output, auth = submit(empty_home, str(config), "--address", url, "--python", sys.executable,
                                    "--no-wait")
        (job_id,) = re.findall(r"submitted job (segprop-run-\w+) to ", output)
        with urllib.request.urlopen(f"{url}/api/jobs/{job_id}", timeout=30) as response:
            job = json.load(response)

    assert code == 0, output[-3000:]
    assert auth == "client auth: RAY_AUTH_MODE=unset ray=disabled"  # no token anywhere: the client stays off
    assert job["submission_id"] == job_id and job["entrypoint"].endswith("-m segprop_ray.cli run config.yaml")


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
    ("http://0.0.0.0:8265", True), ("http://LOCALHOST:8265", True), ("127.0.0.2:8265", True),
    ("http://head.example.com:8265", False), ("10.1.2.3:8265", False), ("http://localhost.example.com:8265", False),
    ("http://[::2]:8265", False),
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
