"""The streamed export: an exit written as HF sharded safetensors (index + one shard per layer), holding one shard
in memory at a time, is the same model as the export that assembles the whole state dict in memory."""

from __future__ import annotations

import json
import math
import weakref

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from helpers import tiny_model_dir
from segprop_ray.core.assemble import exit_config, exit_state_dict, write_model_dir
from segprop_ray.core.parts import ModelParts
from segprop_ray.core.plan import SegPropPlan, split_exit_weights
from segprop_ray.core.weights import SafetensorsSource
from segprop_ray.reporting.export import export_model
from segprop_ray.reporting.export_stream import INDEX_NAME
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.manifest import LayerRecord, Manifest, ManifestStore, ModelInfo
from segprop_ray.storage.weights_store import WeightStore, exit_file, group_committed

NUM_LAYERS, BASE, LAST, DEPTH = 8, 1, 2, 3  # the exit at 3 keeps layers 0-3 and LL 6-7 (renumbered 4-5)


def fake_run(tmp_path, run_dir: str):
    """A run whose committed layers 0..3 and exit 3 are the input model's weights, perturbed."""
    model_dir = tiny_model_dir(tmp_path, num_layers=NUM_LAYERS, hidden=64)
    config = AutoConfig.from_pretrained(model_dir)
    arch, plan = ModelParts(config).layout, SegPropPlan(NUM_LAYERS, BASE, LAST)
    source = SafetensorsSource.from_model_dir(model_dir)
    generator = torch.Generator().manual_seed(0)
    trained = {name: source.get(name) + 0.01 * torch.randn(source.get(name).shape, generator=generator)
               for name in source.keys()}
    committed, exit_weights = split_exit_weights(trained, arch, plan)
    layout = RunLayout.open(run_dir)
    store = WeightStore(layout, tmp_path / "put-cache")
    files = {path: store.put(path, tensors) for path, tensors in
             group_committed(committed, arch, list(range(DEPTH + 1))).items()}
    files[exit_file(DEPTH)] = store.put(exit_file(DEPTH), exit_weights)
    info = ModelInfo(uri=str(model_dir), architecture="LlamaForCausalLM", family="llama", num_layers=NUM_LAYERS,
                     hidden_size=config.hidden_size, vocab_size=config.vocab_size, tied_embeddings=False)
    record = LayerRecord(depth=DEPTH, stage="stage2", status="done", eval_loss=3.0, perplexity=math.exp(3.0),
                         files=files, exit_file=exit_file(DEPTH))
    ManifestStore(layout).write(Manifest(run_id="fake", config_hash="0" * 64, mode="segprop", base_depth=BASE,
                                         last_layers=LAST, model=info, group_size=4, layers={str(DEPTH): record},
                                         final_depth=DEPTH, state="done"))
    return model_dir, committed, exit_weights, plan, arch


def in_memory_export(model_dir, committed, exit_weights, plan, arch, out):
    """The export that holds the whole exit model: exit_state_dict over every tensor, one model.safetensors."""
    state = exit_state_dict(plan, arch, DEPTH, committed, exit_weights)
    return write_model_dir(out, exit_config(AutoConfig.from_pretrained(model_dir), plan, DEPTH), state)


class LiveBytes:
    """Bytes of tensors read from safetensors files that are still alive, and the most at any time."""

    def __init__(self, monkeypatch):
        self.live = self.peak = 0
        original = SafetensorsSource.get

        def tracked_get(source, name):
            tensor = original(source, name)
            self.live += tensor.nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._freed, tensor.nbytes)
            return tensor

        monkeypatch.setattr(SafetensorsSource, "get", tracked_get)

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes


@pytest.mark.parametrize("storage", ["file", "s3"])
def test_streamed_export_equals_the_in_memory_export_holding_one_shard_at_a_time(tmp_path, request, monkeypatch,
                                                                                storage):
    run_dir = (tmp_path / "run").as_uri() if storage == "file" else f"s3://{request.getfixturevalue('s3_bucket')}/run"
    monkeypatch.setenv("SEGPROP_CACHE", str(tmp_path / "cache"))
    model_dir, committed, exit_weights, plan, arch = fake_run(tmp_path, run_dir)
    reference = AutoModelForCausalLM.from_pretrained(
        in_memory_export(model_dir, committed, exit_weights, plan, arch, tmp_path / "in-memory")).eval()
    model_bytes = sum(t.nbytes for t in reference.state_dict().values())
    layer_bytes = sum(t.nbytes for k, t in committed.items() if k.startswith("model.layers.0."))
    head_bytes = sum(t.nbytes for k, t in exit_weights.items() if not k.startswith("model.layers."))
    budget = layer_bytes + head_bytes  # about one layer plus the head: far less than the model
    assert model_bytes > 3 * budget

    live = LiveBytes(monkeypatch)
    depth, out = export_model(run_dir, str(tmp_path / "streamed"), DEPTH, memory_budget=budget)
    monkeypatch.undo()

    assert depth == DEPTH and 0 < live.peak <= max(layer_bytes, head_bytes) and live.live == 0
    written = sorted(p.name for p in (tmp_path / "streamed").iterdir())
    shards = [name for name in written if name.endswith(".safetensors")]
    assert shards == [f"model-{i:05d}-of-00008.safetensors" for i in range(1, 9)]  # embed, 6 layers, norm + head
    assert INDEX_NAME in written and "model.safetensors" not in written and "segprop.json" in written
    index = json.loads((tmp_path / "streamed" / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == model_bytes
    assert index["weight_map"]["model.layers.5.mlp.up_proj.weight"] == "model-00007-of-00008.safetensors"
    streamed = AutoModelForCausalLM.from_pretrained(out).eval()
    assert streamed.config.num_hidden_layers == DEPTH + 1 + LAST
    expected, got = reference.state_dict(), streamed.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, reference(ids).logits)


def test_an_export_whose_largest_shard_exceeds_the_budget_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGPROP_CACHE", str(tmp_path / "cache"))
    fake_run(tmp_path, str(tmp_path / "run"))
    with pytest.raises(StorageError, match=r"exit 3: its largest shard is .* GiB, more than the export's memory"):
        export_model(str(tmp_path / "run"), str(tmp_path / "out"), DEPTH, memory_budget=1024)
    assert not (tmp_path / "out").exists()


def test_a_second_export_replaces_the_first_ones_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGPROP_CACHE", str(tmp_path / "cache"))
    fake_run(tmp_path, str(tmp_path / "run"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"stale")  # e.g. an older single-file export
    (out / "model-00009-of-00009.safetensors").write_bytes(b"stale")
    export_model(str(tmp_path / "run"), str(out), DEPTH)
    assert sorted(p.name for p in out.glob("*.safetensors"))[-1] == "model-00008-of-00008.safetensors"
    assert not (out / "model.safetensors").exists()


def test_units_follow_the_model_and_a_tied_head_joins_the_embedding():
    """One unit per module in model order; with ``head_with_embedding`` (a tied exit, whose head exit_state_dict
    checks against the embedding) the head is read in the same unit as the embedding."""
    from segprop_ray.core.layout import LAYOUTS
    from segprop_ray.reporting.export_stream import plan_shards

    sizes = {"layers/embed.safetensors": {"model.embed_tokens.weight": 40},
             "layers/layer-0.safetensors": {"model.layers.0.mlp.up_proj.weight": 8},
             "layers/layer-10.safetensors": {"model.layers.10.mlp.up_proj.weight": 8},
             "exits/exit-10/ll.safetensors": {"model.layers.11.mlp.up_proj.weight": 8, "lm_head.weight": 40,
                                              "model.norm.weight": 1}}
    untied = plan_shards(LAYOUTS["llama"], sizes, "exits/exit-10/ll.safetensors")
    names = [[name for _, name in unit.tensors] for unit in untied.units]
    assert names == [["model.embed_tokens.weight"], ["model.layers.0.mlp.up_proj.weight"],
                     ["model.layers.10.mlp.up_proj.weight"], ["model.layers.11.mlp.up_proj.weight"],
                     ["lm_head.weight", "model.norm.weight"]]
    assert untied.largest == 41
    tied = plan_shards(LAYOUTS["llama"], sizes, "exits/exit-10/ll.safetensors", head_with_embedding=True)
    assert {name for _, name in tied.units[0].tensors} == {"model.embed_tokens.weight", "lm_head.weight",
                                                          "model.norm.weight"}
    assert len(tied.units) == 4 and tied.largest == 81
