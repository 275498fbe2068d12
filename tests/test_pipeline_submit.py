"""``segprop submit`` through the Ray Jobs API of a token-authenticated local cluster, with learning rate 0:
the job succeeds and the exported model is the input model, logit for logit."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline_setup import logits, make_inputs, pipeline_config, write_config
from segprop_ray.cli import main
from segprop_ray.reporting.export import open_run

pytestmark = pytest.mark.slow


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
