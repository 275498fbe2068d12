"""The hand-over loop of an iteration after preemption notices (no Ray started: the trainer is faked): each notice
starts a new trainer of the same name, at most ``resources.max_preemption_handovers`` times, then the run fails in
one line naming that field."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from helpers import make_config
from segprop_ray.config import ConfigError
from segprop_ray.pipeline import train_job
from segprop_ray.pipeline.preemption import PREEMPTED


def fake_trainers(monkeypatch, outcomes: list) -> list[str]:
    """Trainers whose ``fit`` returns ``outcomes`` in turn; returns the list of run names they were made for."""
    made: list[str] = []
    monkeypatch.setattr(train_job, "_trainer", lambda ctx, name, stage, board: made.append(name) or name)
    monkeypatch.setattr(train_job, "_fit", lambda trainer, board, name, label, on_progress: outcomes[len(made) - 1])
    return made


def context(tmp_path, limit: int) -> SimpleNamespace:
    return SimpleNamespace(cfg=make_config(tmp_path, resources={"max_preemption_handovers": limit}))


def test_an_iteration_preempted_within_the_limit_continues_under_the_same_name(monkeypatch, tmp_path):
    made = fake_trainers(monkeypatch, [{PREEMPTED: 3}, {PREEMPTED: 5}, {"steps": 8}])
    result = train_job.run_trainer(context(tmp_path, 2), name="run-depth2", stage="stage2", label="layer 2")
    assert result == {"steps": 8} and made == ["run-depth2"] * 3


def test_an_iteration_preempted_more_often_than_the_limit_fails_in_one_line(monkeypatch, tmp_path):
    made = fake_trainers(monkeypatch, [{PREEMPTED: step} for step in (3, 5, 7, 9)] + [{"steps": 12}])
    with pytest.raises(train_job.TooManyPreemptions) as failed:
        train_job.run_trainer(context(tmp_path, 2), name="run-depth2", stage="stage2", label="layer 2")
    message = str(failed.value)
    assert len(made) == 3  # the first trainer and two hand-overs, no fourth
    assert "\n" not in message and "resources.max_preemption_handovers (2)" in message
    assert message.startswith("layer 2: preempted 3 times") and "step 7" in message


def test_the_limit_is_a_validated_config_field(tmp_path):
    assert make_config(tmp_path).resources.max_preemption_handovers == 20
    with pytest.raises(ConfigError, match="max_preemption_handovers"):
        make_config(tmp_path, resources={"max_preemption_handovers": -1})
