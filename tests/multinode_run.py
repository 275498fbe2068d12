"""A SegProp run on a four-node Ray cluster on this machine, in its own process (tests/test_pipeline_multinode.py).

``python tests/multinode_run.py CONFIG.json WORK_DIR`` starts ``ray.cluster_utils.Cluster``: a head with no CPUs
(as on KubeRay) and three worker nodes, two spot ones (``ray.io/market-type: spot``, ``segprop/pool: trainer``) and
an on-demand CPU one (``segprop/pool: cpu``), each with its own temporary directory and node cache. It first runs
the config once with a local run directory (refused: several nodes), then for real (with the caller's testing
hooks in the environment, such as ``SEGPROP_TEST_DRAIN_AT``: every node inherits it), and writes
``WORK_DIR/result.json``: the refusal, the manifest, each node's name and cache, where every kind of task and actor
ran, and the node of each Ray Train worker in the order they started (Ray's State API). The cluster is shut down at
the end; nothing else of Ray is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

NODES = {
    "spot-a": {"ray.io/market-type": "spot", "segprop/pool": "trainer"},
    "spot-b": {"ray.io/market-type": "spot", "segprop/pool": "trainer"},
    "cpu": {"ray.io/market-type": "on-demand", "segprop/pool": "cpu"},
}
"""The worker nodes: name -> Ray node labels."""
NAME_LABEL = "segprop-test/node"
"""A label naming each worker node (the two spot nodes have the same labels otherwise)."""
KINDS = {"RayTrainWorker": "trainer", "TokenizeActor": "tokenize", "SnapshotActor": "snapshot",
         "ProgressBoard": "board", "export_task": "export", "stage_task": "stage"}
"""Actor classes / task names (substrings) -> the kind of work they are."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_cluster(work: Path, temp: Path):
    """Head (0 CPUs, dashboard for the State API) and the two labelled worker nodes, each with its own temporary
    directory under ``temp`` (short: Ray's socket paths must stay under 108 bytes) and node cache under ``work``."""
    from ray.cluster_utils import Cluster

    port = free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # the State API of this cluster, not another
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "labels": {"ray.io/market-type": "on-demand"}, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": port, "temp_dir": str(temp / "head")})
    for name, labels in NODES.items():
        cluster.add_node(num_cpus=2, labels={**labels, NAME_LABEL: name}, temp_dir=str(temp / name),
                         env_vars={"SEGPROP_CACHE": str(work / f"cache-{name}")})
    cluster.wait_for_nodes()
    return cluster, f"http://127.0.0.1:{port}"


def refusal_of_a_local_run_dir(raw: dict, work: Path) -> str:
    from segprop_ray.config import validate_config
    from segprop_ray.pipeline.driver import Driver

    try:
        Driver(validate_config({**raw, "run_dir": str(work / "local-run")})).run()
    except Exception as error:  # noqa: BLE001 - the refusal is what is reported
        return f"{type(error).__name__}: {error}"
    return "not refused"


def placements(api: str, node_kinds: dict[str, str]) -> dict[str, list[str]]:
    """Kind of work -> the node names it ran on (actors and tasks, finished ones included)."""
    from ray.util.state import list_actors, list_tasks

    found: dict[str, set[str]] = {}
    records = [(a.class_name, a.node_id) for a in list_actors(address=api, limit=10_000, raise_on_missing_output=False)]
    records += [(t.name, t.node_id) for t in list_tasks(address=api, limit=10_000, raise_on_missing_output=False)]
    for name, node in records:
        for marker, kind in KINDS.items():
            if marker in (name or "") and node:
                found.setdefault(kind, set()).add(node_kinds.get(node, node))
    return {kind: sorted(nodes) for kind, nodes in found.items()}


def trainer_workers(api: str, node_kinds: dict[str, str]) -> list[str]:
    """The node (by name) of every Ray Train worker actor of the run, in the order they were created (their
    creation tasks' times)."""
    from ray.util.state import list_actors, list_tasks

    node_of = {a.actor_id: a.node_id for a in list_actors(address=api, limit=10_000, raise_on_missing_output=False)
               if "RayTrainWorker" in (a.class_name or "")}
    tasks = list_tasks(address=api, limit=10_000, raise_on_missing_output=False, detail=True,
                       filters=[("type", "=", "ACTOR_CREATION_TASK")])
    created = sorted((t.creation_time_ms or 0, node_of[t.actor_id]) for t in tasks if t.actor_id in node_of)
    return [node_kinds.get(node, str(node)) for _, node in created]


def main(config_path: str, work_dir: str) -> None:
    import ray

    from segprop_ray.config import validate_config
    from segprop_ray.pipeline.driver import Driver

    work = Path(work_dir)
    raw = json.loads(Path(config_path).read_text())
    temp = Path(tempfile.mkdtemp(prefix="segprop-mn-"))
    cluster, api = start_cluster(work, temp)
    try:
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        node_kinds = {n["NodeID"]: n["Labels"].get(NAME_LABEL, "head") for n in ray.nodes()}
        refusal = refusal_of_a_local_run_dir(raw, work)
        manifest = Driver(validate_config(raw)).run()
        result = {"refusal": refusal, "manifest": manifest.model_dump(mode="json"),
                  "nodes": sorted(node_kinds.values()), "node_names": node_kinds,
                  "placements": placements(api, node_kinds), "trainer_workers": trainer_workers(api, node_kinds),
                  "caches": {name: sorted(p.relative_to(work / f"cache-{name}").as_posix()
                                          for p in (work / f"cache-{name}").rglob("*") if p.is_file())
                             for name in NODES if (work / f"cache-{name}").exists()}}
        (work / "result.json").write_text(json.dumps(result, indent=2))
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
