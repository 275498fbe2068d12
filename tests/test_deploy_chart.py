"""The Helm chart (helm/segprop); the values documentation and deploy/ are in test_deploy_files.py.

The chart is rendered with real Helm (the library bundled in helm-python-sdk), for its default
values and for the spot GPU values kept beside it, and every RayJob is validated against the
KubeRay v1.7 CRD schema made strict (unknown fields are errors). Then the things a spot GPU run
depends on are checked one by one: placement, the entrypoint and its config, secrets, resources,
graceful termination, names. All offline, in a few seconds.
"""

from __future__ import annotations

import copy
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deploy_checks as dc  # noqa: E402

VALUES_YAML = dc.CHART_DIR / "values.yaml"
FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYFAKESECRETKEY"


VALUE_SETS = {"default": lambda: None, "spot": dc.spot_values}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request) -> tuple[str, dict[str, Any] | None, list[dict[str, Any]]]:
    """(name, values, objects) of one render, shared by the tests of this module."""
    values = VALUE_SETS[request.param]()
    return request.param, values, dc.manifests(dc.render_chart(values))


@pytest.fixture(scope="module")
def spot_docs() -> list[dict[str, Any]]:
    return dc.spot_manifests()


the_job, run_config = dc.the_job, dc.run_config


def merged_values(values: dict[str, Any] | None) -> dict[str, Any]:
    return dc.deep_merge(yaml.safe_load(VALUES_YAML.read_text()), values or {})


# --- lint, schema, strict CRD validation ---------------------------------------------------


@pytest.mark.parametrize("values_name", sorted(VALUE_SETS))
def test_helm_lint_strict_passes(values_name):
    report = dc.helm_sdk().chart.lint(str(dc.CHART_DIR), VALUE_SETS[values_name](), strict=True, namespace="ml")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert report["errors"] == [] and problems == [], report


def test_render_gives_the_config_map_and_the_rayjob(rendered):
    _, _, docs = rendered
    assert sorted(doc["kind"] for doc in docs) == ["ConfigMap", "RayJob"]


def test_rayjob_passes_the_strict_kuberay_crd_schema(rendered):
    _, _, docs = rendered
    for doc in docs:
        errors = dc.validate_rayjob(doc) if doc["kind"] == "RayJob" else dc.metadata_errors(doc)
        assert errors == [], f"{doc['kind']}: {errors}"


def test_strict_validation_catches_misspelled_fields_from_values():
    """A typo inside a pass-through value (affinity, security contexts) reaches the manifest; only
    the strict schema rejects it (the CRD as shipped accepts unknown fields, and the API server
    would silently drop them)."""
    values = {
        "workerGroups": {"snapshot": {"affinity": {"nodeAfinity": {}}}},
        "podSecurityContext": {"runAsNonRot": True},
    }
    job = the_job(dc.manifests(dc.render_chart(values)))
    errors = dc.crd_errors(job)
    assert any("'nodeAfinity'" in e for e in errors), errors
    assert any("'runAsNonRot'" in e for e in errors), errors
    import jsonschema

    crd = dc.load_yaml(dc.CRD_DIR / dc.CRD_FILES["RayJob"])
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert list(jsonschema.Draft7Validator(v1["schema"]["openAPIV3Schema"]).iter_errors(job)) == []


@pytest.mark.parametrize(
    ("where", "mutate"),
    [
        ("nodeSelecter", lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].update(nodeSelecter={})),
        ("rayStartParam", lambda j: dc.worker_group(j, "trainer").update(rayStartParam={})),
        ("enableInTreeAutoscalling", lambda j: j["spec"]["rayClusterSpec"].update(enableInTreeAutoscalling=True)),
        ("shutdownAfterJobFinish", lambda j: j["spec"].update(shutdownAfterJobFinish=True)),
        ("replicas", lambda j: dc.worker_group(j, "snapshot").update(replicas="two")),
        ("mode", lambda j: j["spec"]["rayClusterSpec"]["authOptions"].update(mode="tokens")),
        ("cpu", lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"].update(cpu="four")),
    ],
)
def test_strict_validation_bites(spot_docs, where, mutate):
    job = copy.deepcopy(the_job(spot_docs))
    mutate(job)
    errors = dc.validate_rayjob(job)
    assert any(where in e for e in errors), errors


def test_kuberay_rules_and_name_checks_bite(spot_docs):
    job = copy.deepcopy(the_job(spot_docs))
    job["metadata"]["name"] = "x" * 48
    job["spec"]["shutdownAfterJobFinishes"] = False
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["restartPolicy"] = "Always"
    dc.worker_group(job, "trainer")["labels"]["bad key!"] = "v"
    text = "\n".join(dc.validate_rayjob(job))
    for expected in ("DNS-1035", "shutdownAfterJobFinishes", "restartPolicy", "'bad key!'"):
        assert expected in text


@pytest.mark.parametrize(
    "values",
    [
        {"imagee": {"tag": "x"}},
        {"workerGroups": {"trainer": {"nodeSelecter": {"pool": "gpu"}}}},
        {"workerGroups": {"trainer": {"tolerations": [{"key": "spot", "operater": "Exists"}]}}},
        {"head": {"gpus": 1}},
        {"head": {"rayStartParams": {"num-cpus": "8"}}},
        {"runId": "Run_1"},
        {"job": {"setOverrides": ["training.learning_rate=1e-4; rm -rf /"]}},
        {"workerGroups": {"extra": {"minReplicas": 0, "maxReplicas": 1, "terminationGracePeriodSeconds": 300,
                                  "resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "1", "memory": "1Gi"}}}}},
        {"extraEnv": [{"name": "AWS_SECRET_ACCESS_KEY", "value": FAKE_SECRET}]},
        {"extraEnv": [{"name": "HF_TOKEN", "value": FAKE_SECRET}]},
        {"config": {"storage_options": {"secret": FAKE_SECRET}}},
        {"config": {"storage_options": {"client_kwargs": {"aws_secret_access_key": FAKE_SECRET}}}},
    ],
    ids=lambda v: json.dumps(v)[:60],
)
def test_values_schema_rejects(values):
    chart = dc.load_chart()
    with pytest.raises(dc.helm_sdk().HelmValuesError):
        chart.validate_schema(chart.merge_values(values))
    with pytest.raises(dc.helm_sdk().HelmValuesError):
        dc.render_chart(values)


def test_values_schema_accepts_the_shipped_values_files():
    chart = dc.load_chart()
    for values in (None, dc.spot_values()):
        chart.validate_schema(chart.merge_values(values))


# --- what a spot GPU run depends on --------------------------------------------------------


def test_spot_values_put_workers_on_spot_gpus_and_the_head_on_demand(spot_docs):
    job = the_job(spot_docs)
    for name in ("snapshot", "trainer"):
        group = dc.worker_group(job, name)
        pod = group["template"]["spec"]
        assert pod["nodeSelector"]["karpenter.sh/capacity-type"] == "spot"
        tolerated = {t["key"] for t in pod["tolerations"]}
        assert {"spot", "nvidia.com/gpu"} <= tolerated
        limits = pod["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"
        assert group["labels"]["ray.io/market-type"] == "spot"
        assert group["labels"]["segprop/pool"] == name
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    head_pod = head["template"]["spec"]
    assert head_pod["nodeSelector"] == {"karpenter.sh/capacity-type": "on-demand"}
    assert not any(t["key"] == "spot" for t in head_pod.get("tolerations", []))
    assert head["labels"]["ray.io/market-type"] == "on-demand"
    assert head["rayStartParams"]["num-cpus"] == "0"
    submitter = job["spec"]["submitterPodTemplate"]["spec"]
    assert submitter.get("nodeSelector") == head_pod["nodeSelector"]


def test_head_has_no_gpu_and_runs_no_tasks(rendered):
    _, _, docs = rendered
    cluster = the_job(docs)["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "GPU" not in head.get("resources", {})
    for container in head["template"]["spec"]["containers"]:
        for part in ("requests", "limits"):
            assert not any("gpu" in name.lower() for name in container["resources"][part])


def test_entrypoint_runs_segprop_on_the_mounted_config(rendered):
    _, values, docs = rendered
    job = the_job(docs)
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["segprop", "run"]
    config_path = Path(argv[2])
    head_pod = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head_pod["containers"][0]["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    (volume,) = [v for v in head_pod["volumes"] if v["name"] == mount["name"]]
    (config_map,) = dc.of_kind(docs, "ConfigMap")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert config_path.name in config_map["data"]
    assert run_config(docs) == merged_values(values)["config"]


def test_set_overrides_are_appended_to_the_entrypoint():
    values = {"job": {"setOverrides": ["training.learning_rate=1e-4", "data.train=[s3://b/a.jsonl,s3://b/b.jsonl]"]}}
    job = the_job(dc.manifests(dc.render_chart(values)))
    assert shlex.split(job["spec"]["entrypoint"])[3:] == [
        "--set", "training.learning_rate=1e-4", "--set", "data.train=[s3://b/a.jsonl,s3://b/b.jsonl]",
    ]


def test_the_config_map_holds_a_valid_segprop_config(rendered):
    _, _, docs = rendered
    from segprop_ray.config import validate_config

    config = validate_config(run_config(docs))
    assert config.run_dir.startswith("s3://")


def test_run_config_label_selectors_reach_gpu_worker_groups(rendered):
    _, _, docs = rendered
    job, config = the_job(docs), run_config(docs)
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    for stage in ("snapshot", "stage1", "segment"):
        wanted = config["resources"][stage]
        selector = wanted["label_selector"]
        matches = [g for g in groups if selector.items() <= (g.get("labels") or {}).items()]
        assert matches, f"resources.{stage}.label_selector {selector} matches no worker group"
        needs_gpu = wanted.get("use_gpu") or wanted.get("num_gpus", 0) > 0
        cpus = wanted.get("num_cpus", wanted.get("resources_per_worker", {}).get("CPU", 1))
        for group in matches:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert not needs_gpu or dc.quantity(limits.get("nvidia.com/gpu", 0)) >= 1, group["groupName"]
            assert dc.quantity(limits["cpu"]) >= cpus, group["groupName"]


def test_no_secret_value_reaches_a_manifest(monkeypatch):
    """Credentials are referenced by Secret name only: a secret value in the environment of the
    renderer, or one a user tries to inline, never appears in what is applied to the cluster."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("RAY_AUTH_TOKEN", FAKE_SECRET)
    values = dc.deep_merge(
        dc.spot_values(),
        {
            "s3": {"existingSecret": "segprop-s3"},
            "auth": {"secretName": "segprop-ray-token"},
            "extraEnv": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
        },
    )
    rendered = dc.render_chart(values)
    assert not any(FAKE_SECRET in text for text in rendered.values())
    docs = dc.manifests(rendered)
    assert dc.inline_secret_errors(docs) == []
    job = the_job(docs)
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": "segprop-ray-token"}
    for where, container in dc.containers(job):
        if where.startswith(("head/ray-head", "worker group")):
            assert container["envFrom"] == [{"secretRef": {"name": "segprop-s3"}}], where
            (hf,) = [e for e in container["env"] if e["name"] == "HF_TOKEN"]
            assert hf == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    for doc in docs:
        assert doc["kind"] != "Secret"


def test_inline_secret_detection_bites(spot_docs):
    job = copy.deepcopy(the_job(spot_docs))
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "AWS_SECRET_ACCESS_KEY", "value": FAKE_SECRET}
    )
    assert dc.inline_secret_errors([job]) == ["head/ray-head: AWS_SECRET_ACCESS_KEY has an inline value"]


def test_every_container_has_requests_and_limits(rendered):
    _, _, docs = rendered
    assert dc.container_resource_errors(the_job(docs)) == []


def test_resource_check_bites(spot_docs):
    job = copy.deepcopy(the_job(spot_docs))
    del job["spec"]["rayClusterSpec"]["autoscalerOptions"]["resources"]["limits"]
    dc.worker_group(job, "trainer")["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] = "9"
    errors = dc.container_resource_errors(job)
    assert any("autoscaler" in e and "limits" in e for e in errors)
    assert any("trainer" in e and "request 9 > limit" in e for e in errors)


def test_grace_period_covers_drain_and_checkpoint(rendered):
    _, values, docs = rendered
    job = the_job(docs)
    drain = merged_values(values)["gracefulShutdown"]["drainTimeoutSeconds"]
    for where, template in dc.pod_templates(job):
        if where == "submitter":
            continue
        grace = template["spec"]["terminationGracePeriodSeconds"]
        container = template["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] == str(drain), where
        assert grace > drain, where
        if where.startswith("worker group"):
            assert grace >= drain + 60, f"{where}: no time left for a checkpoint upload"
            script = container["lifecycle"]["preStop"]["exec"]["command"][-1]
            budget = int(script.split("budget=")[1].split()[0])
            assert 30 <= budget <= grace - drain, where
            assert "DRAIN_NODE_REASON_PREEMPTION" in script


def test_too_short_grace_period_fails_the_render():
    with pytest.raises(dc.helm_sdk().HelmRenderError, match="drainTimeoutSeconds"):
        dc.render_chart({"workerGroups": {"trainer": {"terminationGracePeriodSeconds": 30}}})
    with pytest.raises(dc.helm_sdk().HelmRenderError, match="preStop"):
        dc.render_chart({"workerGroups": {"trainer": {"terminationGracePeriodSeconds": 60}}})
    job = the_job(dc.manifests(dc.render_chart({
        "gracefulShutdown": {"preStopDrain": False},
        "workerGroups": {"trainer": {"terminationGracePeriodSeconds": 60}},
    })))
    assert "lifecycle" not in dc.worker_group(job, "trainer")["template"]["spec"]["containers"][0]


def test_job_lifecycle_settings(rendered):
    _, values, docs = rendered
    spec = the_job(docs)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1
    assert spec["submissionMode"] == "K8sJobMode"
    assert "deletionStrategy" not in spec
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]["version"] == "v2"
    assert cluster["rayVersion"] == merged_values(values)["rayVersion"]


def test_rayjob_name_carries_the_run_id():
    job = the_job(dc.manifests(dc.render_chart({"runId": 7}, name="llama-ft")))
    assert job["metadata"]["name"] == "llama-ft-segprop-7"
    assert job["metadata"]["labels"]["segprop/run-id"] == "7"
    (config_map,) = dc.of_kind(dc.manifests(dc.render_chart({"runId": "b2"}, name="segprop")), "ConfigMap")
    assert config_map["metadata"]["name"] == "segprop-b2-config"


def test_too_long_rayjob_name_fails_instead_of_truncating():
    with pytest.raises(dc.helm_sdk().HelmRenderError, match="47"):
        dc.render_chart({"runId": "attempt-000000000001"}, name="a-rather-long-release-name-x")


def test_service_account_for_irsa():
    values = {"serviceAccount": {"create": True, "annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/x"}}}
    docs = dc.manifests(dc.render_chart(values))
    (account,) = dc.of_kind(docs, "ServiceAccount")
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].endswith("role/x")
    assert dc.metadata_errors(account) == []
    job = the_job(docs)
    for where, template in dc.pod_templates(job):
        if where != "submitter":
            assert template["spec"]["serviceAccountName"] == account["metadata"]["name"], where


def test_a_disabled_group_is_left_out_and_an_added_one_rendered():
    values = dc.deep_merge(dc.spot_values(), {"workerGroups": {"snapshot": {"enabled": False}, "trainer-ondemand": {"enabled": True}}})
    job = the_job(dc.manifests(dc.render_chart(values)))
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert sorted(groups) == ["cpu", "snapshot-ondemand", "trainer", "trainer-ondemand"]
    assert groups["trainer-ondemand"]["priority"] < groups["trainer"]["priority"]
    assert dc.validate_rayjob(job) == []
