"""Cluster settings the driver applies (no Ray cluster needed): Ray Train's worker-group start timeout reaches its
controller, Ray Data jobs get the CPU group's labels only while asked, the config's placement options are ones
Ray accepts for tasks and actors, and a local run directory is refused before a job once a second node joined."""

from __future__ import annotations

import pytest

from helpers import make_config
from segprop_ray.pipeline.cluster import DEFAULT_START_TIMEOUT_S, START_TIMEOUT_ENV, apply_train_settings


@pytest.mark.parametrize("configured,environment,expected", [
    (None, None, f"{DEFAULT_START_TIMEOUT_S:g}"),  # raised from Ray's 60 s for GPU pools scaling from zero
    (1800.0, None, "1800"),
    (None, "1200", "1200"),  # an operator's own setting stays
    (1800.0, "1200", "1800"),  # the config wins
])
def test_worker_group_start_timeout_is_propagated_to_the_train_controller(monkeypatch, tmp_path, configured,
                                                                         environment, expected):
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    if environment:
        monkeypatch.setenv(START_TIMEOUT_ENV, environment)
    cfg = make_config(tmp_path, resources={"worker_group_start_timeout_s": configured})

    assert apply_train_settings(cfg) == expected
    assert get_env_vars_to_propagate()[START_TIMEOUT_ENV] == expected  # what the driver hands the controller


def test_cpu_group_labels_apply_to_ray_data_only_within_the_block():
    import ray.data

    from segprop_ray.pipeline.cluster import data_label_selector

    options = ray.data.DataContext.get_current().execution_options
    before = options.label_selector
    with data_label_selector({"segprop/pool": "cpu"}):
        assert ray.data.DataContext.get_current().execution_options.label_selector == {"segprop/pool": "cpu"}
    assert options.label_selector == before
    with data_label_selector({}):
        assert options.label_selector == before


def test_placement_options_are_valid_ray_options(tmp_path):
    from ray._common.ray_option_utils import validate_actor_options, validate_task_options

    cfg = make_config(tmp_path, resources={
        "snapshot": {"label_selector": {"segprop/pool": "snapshot", "ray.io/market-type": "spot"},
                     "fallback_label_selectors": [{"segprop/pool": "snapshot", "ray.io/market-type": "on-demand"}]},
        "export": {"memory_gb": 0.5, "label_selector": {"segprop/pool": "cpu"}},
        "cpu": {"label_selector": {"segprop/pool": "cpu"}},
    })
    snapshot = cfg.resources.snapshot.ray_options()
    assert snapshot["fallback_strategy"] == [{"label_selector": {"segprop/pool": "snapshot",
                                                                 "ray.io/market-type": "on-demand"}}]
    assert cfg.resources.export.ray_options() == {"num_cpus": 1, "memory": 1 << 29,
                                                   "label_selector": {"segprop/pool": "cpu"}}
    validate_actor_options(snapshot, in_options=True)
    for options in (snapshot, cfg.resources.export.ray_options(), cfg.resources.cpu.ray_options()):
        validate_task_options(options, in_options=True)


def fake_nodes(monkeypatch, count: int) -> None:
    """``ray.nodes()`` reporting ``count`` alive nodes with CPUs (no Ray started)."""
    import ray

    nodes = [{"Alive": True, "NodeID": f"node-{i}", "Resources": {"CPU": 2.0}} for i in range(count)]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)


def test_a_local_run_dir_is_refused_before_a_job_once_a_second_node_joined(monkeypatch, tmp_path):
    from pipeline_setup import make_inputs, pipeline_config, write_config
    from segprop_ray.config import ConfigError, load_config
    from segprop_ray.pipeline import driver as driver_module

    model, train, evaluation = make_inputs(tmp_path)
    run_dir = str(tmp_path / "run")
    config = write_config(tmp_path / "config.yaml", pipeline_config(run_dir, str(model), str(train), str(evaluation)))
    driver = driver_module.Driver(load_config(str(config)))
    driver.prepare()
    launched: list[int] = []
    monkeypatch.setattr(driver_module, "tokenize_and_pack", lambda ctx, *args: launched.append(ctx.depth))
    try:
        fake_nodes(monkeypatch, 1)
        driver._context(depth=-1)  # one node: a local run directory is fine
        fake_nodes(monkeypatch, 2)  # the autoscaler adds a worker node while the run goes on
        with pytest.raises(ConfigError) as refused:
            driver.tokenize()
    finally:
        driver.setup.lease.release()
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"run_dir {run_dir} is a local path")
    assert "has 2 nodes (a node joined the cluster)" in message
    assert launched == []  # refused before the job started
