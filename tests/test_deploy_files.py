"""The documentation of the chart's values and the deployment files in deploy/: the plain RayJob manifest is
what the chart renders, the VM cluster config passes Ray's schema and matches the run config, and the scripts
call what they should (with stand-ins for ``segprop`` and ``ray``). All offline.
"""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deploy_checks as dc  # noqa: E402
import values_docs  # noqa: E402

VALUES_YAML = dc.CHART_DIR / "values.yaml"
SCHEMA = json.loads((dc.CHART_DIR / "values.schema.json").read_text())
DEPLOY = dc.REPO / "deploy"
the_job = dc.the_job


@pytest.fixture(scope="module")
def spot_docs() -> list[dict[str, Any]]:
    return dc.spot_manifests()


# --- documentation of the values -----------------------------------------------------------


def test_every_value_is_documented():
    assert values_docs.values_doc_errors(VALUES_YAML.read_text(), SCHEMA) == []


def test_documentation_check_bites():
    text = VALUES_YAML.read_text().replace("    # -- Most workers the autoscaler creates.\n", "", 1)
    assert values_docs.values_doc_errors(text, SCHEMA) == ["workerGroups.cpu.maxReplicas: no '# --' comment"]


def test_readme_values_table_is_current():
    readme = (dc.CHART_DIR / "README.md").read_text()
    assert values_docs.readme_table(readme) == values_docs.values_table(VALUES_YAML.read_text()), (
        "regenerate it: .venv/bin/python tests/values_docs.py update-readme"
    )


# --- deploy/: the plain manifest, the VM cluster, the scripts ------------------------------


def test_plain_rayjob_manifest_is_what_the_chart_renders(spot_docs):
    """deploy/rayjob.yaml is the chart rendered with its spot values (release `segprop`), less the
    Helm bookkeeping labels: valid, and the same object for object."""
    plain = dc.parse_manifests([(DEPLOY / "rayjob.yaml").read_text()])
    assert sorted(d["kind"] for d in plain) == ["ConfigMap", "RayJob"]
    assert dc.validate_rayjob(the_job(plain)) == []
    for kind in ("ConfigMap", "RayJob"):
        (ours,) = dc.of_kind(plain, kind)
        (chart,) = dc.of_kind(spot_docs, kind)
        assert dc.comparable(ours) == dc.comparable(chart), f"deploy/rayjob.yaml {kind} differs from the chart"


def test_plain_manifest_comparison_bites(spot_docs):
    job = copy.deepcopy(the_job(spot_docs))
    before = dc.comparable(job)
    dc.worker_group(job, "trainer")["template"]["spec"]["terminationGracePeriodSeconds"] = 30
    assert dc.comparable(job) != before


def ray_autoscaler_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_launcher_config():
    import jsonschema

    cluster = yaml.safe_load((DEPLOY / "cluster-aws.yaml").read_text())
    jsonschema.validate(cluster, ray_autoscaler_schema())
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert "InstanceMarketOptions" not in head["node_config"]
    spot = {n: t for n, t in types.items() if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"}
    on_demand = {n: t for n, t in types.items() if n not in spot and n != cluster["head_node_type"]}
    assert {t["labels"]["segprop/pool"] for t in spot.values()} == {"snapshot", "trainer"}
    for node_type in spot.values():
        assert node_type["labels"]["ray.io/market-type"] == "spot"
        assert node_type["node_config"]["InstanceType"].startswith(("g", "p"))  # GPU families
    cpu_pools = {n: t for n, t in on_demand.items() if t["labels"]["segprop/pool"] == "cpu"}
    assert cpu_pools and all(t["node_config"]["InstanceType"].startswith("m") for t in cpu_pools.values())
    for node_type in (t for n, t in on_demand.items() if n not in cpu_pools):
        assert node_type["labels"]["ray.io/market-type"] == "on-demand"
        same_pool = [t for t in spot.values() if t["labels"]["segprop/pool"] == node_type["labels"]["segprop/pool"]]
        assert same_pool and all(node_type["priority"] < t["priority"] for t in same_pool)
    assert "--env RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    assert "~/.ray/auth_token" in cluster["file_mounts"]
    local_script = cluster["file_mounts"]["~/spot-watch.sh"]
    assert (dc.REPO / local_script).is_file()
    assert any("spot-watch.sh" in cmd for cmd in cluster["worker_start_ray_commands"])


def test_vm_run_config_matches_the_cluster_node_types():
    from segprop_ray.config import validate_config

    raw = yaml.safe_load((DEPLOY / "run-config.yaml").read_text())
    validate_config(raw)
    cluster = yaml.safe_load((DEPLOY / "cluster-aws.yaml").read_text())
    labels = [t.get("labels", {}) for t in cluster["available_node_types"].values()]
    for stage in ("snapshot", "stage1", "segment", "cpu", "export"):
        selector = raw["resources"][stage]["label_selector"]
        assert any(selector.items() <= node.items() for node in labels), stage


def test_scripts_are_executable_bash():
    for script in ("submit.sh", "spot-watch.sh"):
        path = DEPLOY / script
        assert path.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"
        subprocess.run(["bash", "-n", str(path)], check=True)


@pytest.fixture
def stub_bin(tmp_path):
    """`segprop` and `ray` stand-ins that record their arguments and RAY_AUTH_MODE."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("segprop", "ray"):
        stub = bin_dir / name
        stub.write_text(
            "#!/usr/bin/env bash\n"
            f'{{ echo "RAY_AUTH_MODE=$RAY_AUTH_MODE"; printf "%s\\n" "{name}" "$@"; }} > "$STUB_LOG"\n'
        )
        stub.chmod(0o755)
    return bin_dir


def run_submit(stub_bin, tmp_path, *args, token=True):
    env = {**os.environ, "PATH": f"{stub_bin}:{os.environ['PATH']}", "HOME": str(tmp_path), "STUB_LOG": str(tmp_path / "log")}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.pop("RAY_ADDRESS", None)
    if token:
        env["RAY_AUTH_TOKEN"] = "t"
    else:
        env.pop("RAY_AUTH_TOKEN", None)
    result = subprocess.run(["bash", str(DEPLOY / "submit.sh"), *args], env=env, capture_output=True, text=True)
    log = (tmp_path / "log").read_text().splitlines() if (tmp_path / "log").exists() else []
    return result, log


def test_submit_script_uses_segprop_submit_with_token_auth(stub_bin, tmp_path):
    config = str(DEPLOY / "run-config.yaml")
    result, log = run_submit(stub_bin, tmp_path, config, "--address", "http://head:8265")
    assert result.returncode == 0, result.stderr
    assert log == ["RAY_AUTH_MODE=token", "segprop", "submit", config, "--address", "http://head:8265"]


def test_submit_script_plain_ray_job(stub_bin, tmp_path):
    config = str(DEPLOY / "run-config.yaml")
    result, log = run_submit(stub_bin, tmp_path, config, "--ray-job", "--no-wait", "--", "--set", "training.max_steps=10")
    assert result.returncode == 0, result.stderr
    assert log[:4] == ["RAY_AUTH_MODE=token", "ray", "job", "submit"]
    args = log[4:]
    assert args[args.index("--address") + 1] == "http://127.0.0.1:8265"
    assert "--no-wait" in args and "--working-dir" in args
    runtime_env = json.loads(args[args.index("--runtime-env-json") + 1])
    assert set(runtime_env) == {"env_vars"}
    assert not any(dc.SECRET_ENV_NAME.search(name) for name in runtime_env["env_vars"])
    assert args[args.index("--") + 1 :] == ["segprop", "run", "config.yaml", "--set", "training.max_steps=10"]


def test_submit_script_refuses_without_a_token(stub_bin, tmp_path):
    result, log = run_submit(stub_bin, tmp_path, str(DEPLOY / "run-config.yaml"), token=False)
    assert result.returncode != 0 and "auth token" in result.stderr and log == []
