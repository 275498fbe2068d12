"""Cluster settings the driver applies (no Ray cluster needed): Ray Train's worker-group start timeout reaches its
controller, Ray Data jobs get the CPU group's labels only while asked, and the config's placement options are ones
Ray accepts for tasks and actors."""

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
