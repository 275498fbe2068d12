"""The split self-check's own rules: the small copy it builds, the exit shape it exports, what it refuses before any
work, and its verdict cache (keyed on the code it exercises), run from the prepare-time entry point without Ray."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from transformers import AutoConfig

from helpers import make_config, tiny_model_dir
from segprop_ray.core import self_check
from segprop_ray.core.layout import UnsupportedArchitecture
from segprop_ray.core.self_check import check_model_family, check_plan, core_source_hash
from segprop_ray.core.self_check_config import small_config, small_kv_heads

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, max_position_embeddings=64)


def llama(layers: int = 4, heads: int = 4, kv: int = 2, **extra):
    return AutoConfig.for_model("llama", **{**COMMON, "num_hidden_layers": layers, "num_attention_heads": heads,
                                            "num_key_value_heads": kv, **extra})


@pytest.fixture
def verdicts(monkeypatch):
    """Counts the checks actually run (a recalled verdict runs none)."""
    calls = []
    real = self_check._verdict

    def counted(small):
        calls.append(small.model_type)
        return real(small)

    monkeypatch.setattr(self_check, "_verdict", counted)
    return calls


@pytest.mark.parametrize("head_width", [12, 128])  # widths kept as they are, or shrunk
@pytest.mark.parametrize("heads, kv", [(2, 2), (3, 3), (2, 1), (3, 1), (4, 4), (4, 2)])
def test_a_model_with_few_heads_keeps_its_own_heads_and_passes(heads, kv, head_width):
    config = llama(heads=heads, kv=kv, hidden_size=head_width * heads)
    small = small_config(config)
    assert (small.num_attention_heads, small.num_key_value_heads) == (heads, kv)
    assert check_model_family(config)["ok"]


@pytest.mark.parametrize("family, fields", [
    ("qwen2", dict(hidden_size=96, intermediate_size=64, num_attention_heads=3, num_key_value_heads=3)),
    ("phi3", dict(hidden_size=96, intermediate_size=64, num_attention_heads=3, num_key_value_heads=3, pad_token_id=0)),
    ("gpt2", dict(n_embd=96, n_head=3, bos_token_id=0, eos_token_id=0))])
def test_a_hidden_size_shrunk_below_its_heads_still_splits_into_even_head_widths(family, fields):
    config = AutoConfig.for_model(family, vocab_size=128, num_hidden_layers=4, **fields)
    small = small_config(config)
    assert small.num_attention_heads == 3 and small.hidden_size == 48
    assert check_model_family(config)["ok"]


@pytest.mark.parametrize("heads, kv, small_kv", [(32, 32, 4), (32, 8, 1), (32, 16, 2), (8, 1, 1), (12, 4, 1),
                                                 (6, 3, 2), (24, 12, 2)])
def test_shrunk_heads_keep_the_grouping_ratio_and_never_exceed_the_heads(heads, kv, small_kv):
    assert small_kv_heads(heads, kv, 4) == small_kv
    small = small_config(llama(heads=heads, kv=kv, hidden_size=16 * heads, head_dim=16))
    assert small.num_attention_heads == 4 and small.num_key_value_heads == small_kv
    assert check_model_family(llama(heads=heads, kv=kv, hidden_size=16 * heads, head_dim=16))["ok"]


@pytest.mark.parametrize("layers, exit_layers", [(1, [0]), (2, [0]), (3, [0, 2]), (4, [0, 2, 3]), (6, [0, 2, 3])])
def test_the_check_exports_an_exit_every_model_can_have_with_real_ll_layers(layers, exit_layers):
    verdict = check_model_family(llama(layers=layers))
    assert verdict["ok"] and verdict["exit_layers"] == exit_layers == check_plan(min(layers, 4)).exit_layers(0)


def test_a_three_layer_model_passes_the_check_inside_the_runs_own_preparation(tmp_path, monkeypatch, verdicts):
    from segprop_ray.pipeline.prepare import inspect_model

    monkeypatch.setenv("SEGPROP_CACHE", str(tmp_path / "cache"))
    model_dir = tiny_model_dir(tmp_path, num_layers=3)
    info, _ = inspect_model(make_config(model_dir, segprop={"base_depth": 0, "last_layers": 1}))
    assert info.num_layers == 3 and verdicts == ["llama"]


def test_the_prepare_time_entry_point_runs_the_check_once_and_remembers_it(tmp_path, monkeypatch, verdicts):
    from segprop_ray.pipeline.prepare import inspect_model

    monkeypatch.setenv("SEGPROP_CACHE", str(tmp_path / "cache"))
    cfg = make_config(tiny_model_dir(tmp_path, num_layers=6))
    inspect_model(cfg)
    remembered = list((tmp_path / "cache" / "self-check").glob("*.json"))
    assert verdicts == ["llama"] and len(remembered) == 1
    assert json.loads(remembered[0].read_text())["ok"] is True
    inspect_model(cfg)
    assert verdicts == ["llama"]  # recalled, not rebuilt


def test_a_verdict_is_not_recalled_across_a_change_of_the_code_it_checks(tmp_path, monkeypatch, verdicts):
    config = llama()
    check_model_family(config, tmp_path)
    check_model_family(config, tmp_path)
    assert verdicts == ["llama"]
    monkeypatch.setattr(self_check, "core_source_hash", lambda: "another version of segprop_ray/core")
    check_model_family(config, tmp_path)
    assert verdicts == ["llama", "llama"] and len(list((tmp_path / "self-check").glob("*.json"))) == 2


def test_a_stale_refusal_is_not_recalled_after_the_code_changes(tmp_path, monkeypatch, verdicts):
    config = llama()
    key = self_check._cache_key(small_config(config))
    self_check._remember(tmp_path, key, {"ok": False, "problem": "model family llama: refused by an older check"})
    with pytest.raises(UnsupportedArchitecture, match="refused by an older check"):
        check_model_family(config, tmp_path)
    monkeypatch.setattr(self_check, "core_source_hash", lambda: "the fixed code")
    assert check_model_family(config, tmp_path)["ok"] and verdicts == ["llama"]


@pytest.mark.parametrize("error,remembered", [(OSError("No space left on device"), False),
                                               (RuntimeError("size of tensor a (2) must match"), True)])
def test_a_failure_of_the_machine_is_refused_but_not_remembered(tmp_path, monkeypatch, verdicts, error, remembered):
    """A full disk or a missing package refuses this run, and the next run checks again; a failure of the family
    itself is remembered like any verdict."""
    real = self_check._random_model

    def failing(config):
        raise error

    monkeypatch.setattr(self_check, "_random_model", failing)
    message = f"model family llama failed the split self-check: {type(error).__name__}: {error}"
    with pytest.raises(UnsupportedArchitecture, match=f"^{re.escape(message)}$"):
        check_model_family(llama(), tmp_path)
    monkeypatch.setattr(self_check, "_random_model", real)
    if remembered:
        with pytest.raises(UnsupportedArchitecture):
            check_model_family(llama(), tmp_path)
        assert verdicts == ["llama"]
    else:
        assert check_model_family(llama(), tmp_path)["ok"] and verdicts == ["llama", "llama"]


def test_the_source_hash_follows_every_source_file_of_the_package(tmp_path):
    copy = tmp_path / "core"
    shutil.copytree(Path(self_check.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = core_source_hash.__wrapped__(copy)
    assert before == core_source_hash.__wrapped__(copy) == core_source_hash()
    (copy / "assemble.py").write_text((copy / "assemble.py").read_text() + "\n# a fix\n")
    assert core_source_hash.__wrapped__(copy) != before


def test_the_router_auxiliary_loss_is_refused_in_one_line_before_any_work(tmp_path, monkeypatch, verdicts):
    def no_work(*_):
        raise AssertionError("the check built something")

    monkeypatch.setattr(self_check, "small_config", no_work)
    config = AutoConfig.for_model("mixtral", **COMMON, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, num_local_experts=4, output_router_logits=True)
    with pytest.raises(UnsupportedArchitecture) as refused:
        check_model_family(config, tmp_path)
    assert str(refused.value) == ("model family mixtral: the router's auxiliary loss (output_router_logits: true) is "
                                  "not supported; set output_router_logits to false in config.json")
    assert verdicts == [] and not (tmp_path / "self-check").exists()


def test_gpt2_scaled_by_its_layer_index_is_refused_naming_the_field(tmp_path):
    config = AutoConfig.for_model("gpt2", vocab_size=128, n_embd=32, n_layer=6, n_head=4, n_positions=64,
                                  scale_attn_by_inverse_layer_idx=True, bos_token_id=0, eos_token_id=0)
    with pytest.raises(UnsupportedArchitecture) as refused:
        check_model_family(config, tmp_path)
    assert str(refused.value) == ("model family gpt2 is not supported: scale_attn_by_inverse_layer_idx: true makes "
                                  "each layer compute with its own index, which an exit exported with renumbered "
                                  "layers cannot keep")
    config.scale_attn_by_inverse_layer_idx = False
    assert check_model_family(config, tmp_path)["ok"]
