"""What an operator on EKS or GKE with Karpenter needs from the chart at 7B, one check each: the head is never
moved by a node autoscaler and has /dev/shm, the job has a deadline, the snapshot pool an on-demand fallback, CPU
work a CPU group off the GPU nodes, every worker a size-limited cache volume with an ephemeral-storage request,
HF_TOKEN comes from a Secret, the dashboard port-forward names the service KubeRay creates, and the RayJob names its
run directory for ``segprop submit``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deploy_checks as dc  # noqa: E402

VALUE_SETS = {"default": lambda: None, "spot": dc.spot_values}


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request):
    values = VALUE_SETS[request.param]()
    return values, dc.manifests(dc.render_chart(values))


def head_pod(job):
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]


def groups(job):
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"]


def matching(job, selector):
    return [g for g in groups(job) if selector.items() <= (g.get("labels") or {}).items()]


def gpus(group) -> float:
    return dc.quantity(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))


def volume(pod_spec, mount_path):
    container = pod_spec["containers"][0]
    (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == mount_path]
    (found,) = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    return found


def test_the_head_is_not_moved_by_karpenter_or_the_cluster_autoscaler(rendered):
    _, docs = rendered
    annotations = head_pod(dc.the_job(docs))["metadata"]["annotations"]
    assert annotations["karpenter.sh/do-not-disrupt"] == "true"
    assert annotations["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"
    own = dc.the_job(dc.manifests(dc.render_chart({"head": {"podAnnotations": {"team": "ml"}}})))
    assert head_pod(own)["metadata"]["annotations"]["team"] == "ml"
    assert head_pod(own)["metadata"]["annotations"]["karpenter.sh/do-not-disrupt"] == "true"
    off = dc.the_job(dc.manifests(dc.render_chart({"head": {"doNotDisrupt": False}})))
    assert "annotations" not in head_pod(off)["metadata"]


def test_the_head_has_a_memory_backed_dev_shm(rendered):
    _, docs = rendered
    shm = volume(head_pod(dc.the_job(docs))["spec"], "/dev/shm")
    assert shm["emptyDir"]["medium"] == "Memory" and dc.quantity(shm["emptyDir"]["sizeLimit"]) >= 2**30


def test_a_stopped_jobs_driver_has_time_to_release_its_lease(rendered):
    """Ray's job supervisor kills a stopped job's driver 3 s after SIGTERM unless told otherwise: too short for the
    manifest write and the conditional lease release on S3."""
    _, docs = rendered
    env = {e["name"]: e.get("value") for e in head_pod(dc.the_job(docs))["spec"]["containers"][0]["env"]}
    assert int(env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 30


def test_the_job_has_an_active_deadline(rendered):
    _, docs = rendered
    spec = dc.the_job(docs)["spec"]
    assert spec["activeDeadlineSeconds"] >= 24 * 3600 > spec["preRunningDeadlineSeconds"]


def test_the_snapshot_pool_falls_back_to_on_demand_gpus():
    docs = dc.spot_manifests()
    job, snapshot = dc.the_job(docs), dc.run_config(docs)["resources"]["snapshot"]
    primary = matching(job, snapshot["label_selector"])
    (fallback_selector,) = snapshot["fallback_label_selectors"]
    fallback = matching(job, fallback_selector)
    assert primary and fallback and not {g["groupName"] for g in primary} & {g["groupName"] for g in fallback}
    for group in primary:
        assert group["template"]["spec"]["nodeSelector"]["karpenter.sh/capacity-type"] == "spot"
    for group in fallback:
        pod = group["template"]["spec"]
        assert pod["nodeSelector"]["karpenter.sh/capacity-type"] == "on-demand" and gpus(group) >= 1
        assert not any(t["key"] == "spot" for t in pod.get("tolerations", []))
        assert group["priority"] < min(g["priority"] for g in primary)  # spot preferred while it has capacity


def test_cpu_work_runs_on_a_cpu_group_off_the_gpu_nodes(rendered):
    _, docs = rendered
    job, resources = dc.the_job(docs), dc.run_config(docs)["resources"]
    for kind in ("cpu", "export"):
        chosen = matching(job, resources[kind]["label_selector"])
        assert chosen, f"resources.{kind}.label_selector matches no worker group"
        for group in chosen:
            tolerations = group["template"]["spec"].get("tolerations") or []
            assert gpus(group) == 0 and not any(t["key"] == "nvidia.com/gpu" for t in tolerations), group["groupName"]
    from segprop_ray.config import validate_config

    config = validate_config(dc.run_config(docs))
    (cpu_group,) = matching(job, config.resources.cpu.label_selector)
    limits = cpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert dc.quantity(limits["cpu"]) >= config.resources.tokenize_actors * config.resources.tokenize_cpus + 1
    assert dc.quantity(limits["memory"]) >= config.resources.export.memory_gb * 2**30


def test_every_worker_has_a_size_limited_cache_and_requests_ephemeral_storage(rendered):
    _, docs = rendered
    for group in groups(dc.the_job(docs)):
        pod = group["template"]["spec"]
        cache = volume(pod, "/cache")["emptyDir"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["SEGPROP_CACHE"].startswith("/cache/") and env["HF_HOME"].startswith("/cache/")
        assert 0 < float(env["SEGPROP_CACHE_MAX_GB"]) * 2**30 < dc.quantity(cache["sizeLimit"])
        requested = pod["containers"][0]["resources"]["requests"]["ephemeral-storage"]
        assert dc.quantity(requested) >= dc.quantity(cache["sizeLimit"]), group["groupName"]
    head = head_pod(dc.the_job(docs))["spec"]["containers"][0]["resources"]["requests"]
    assert dc.quantity(head["ephemeral-storage"]) > 0


def test_a_cache_volume_of_ones_own_replaces_the_empty_dir():
    values = {"workerGroups": {"trainer": {"cacheVolume": {"hostPath": {"path": "/mnt/nvme/segprop"}}}}}
    job = dc.the_job(dc.manifests(dc.render_chart(values)))
    cache = volume(dc.worker_group(job, "trainer")["template"]["spec"], "/cache")
    assert cache == {"name": "cache", "hostPath": {"path": "/mnt/nvme/segprop"}}
    assert dc.validate_rayjob(job) == []


def test_hf_token_comes_from_a_secret_into_every_ray_container():
    values = {"huggingface": {"tokenSecret": "hf-token", "tokenSecretKey": "hf"}}
    docs = dc.manifests(dc.render_chart(values))
    job = dc.the_job(docs)
    for where, container in dc.containers(job):
        if where.startswith(("head/ray-head", "worker group")):
            (token,) = [e for e in container["env"] if e["name"] == "HF_TOKEN"]
            assert token == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "hf"}}}
    assert dc.inline_secret_errors(docs) == []
    unset = dc.the_job(dc.manifests(dc.render_chart(None)))
    assert not [e for _, e in dc.env_entries(unset) if e["name"] == "HF_TOKEN"]


def test_the_dashboard_port_forward_names_the_head_service_kuberay_creates():
    """KubeRay names the head Service after the RayCluster (``<rayjob>-<suffix>-head-svc``, shortened past 50
    characters) and labels it ``ray.io/cluster`` and ``ray.io/node-type: head``: the notes look it up by those."""
    notes = dc.render_chart(None)["segprop/templates/NOTES.txt"]
    lines = [line.strip() for line in notes.splitlines()]
    cluster = next(line for line in lines if line.startswith("CLUSTER="))
    head = next(line for line in lines if line.startswith("HEAD_SVC="))
    forward = next(line for line in lines if "port-forward" in line)
    assert "jsonpath='{.status.rayClusterName}'" in cluster
    assert "get svc -l ray.io/cluster=$CLUSTER,ray.io/node-type=head" in head
    assert "svc/$HEAD_SVC 8265:8265" in forward and "-head-svc" not in forward


def test_the_rayjob_names_its_run_directory_for_segprop_submit(rendered):
    from segprop_ray.pipeline.submit import RUN_DIR_KEY

    _, docs = rendered
    metadata = dc.the_job(docs)["spec"]["metadata"]
    assert metadata[RUN_DIR_KEY] == dc.run_config(docs)["run_dir"].rstrip("/")

