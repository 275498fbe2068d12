"""The split self-check: before any work, prove on a small random copy of the model that the split is exact.

From the model's own config, a copy with random weights, a few layers (enough to hold every layer type the
config uses) and small widths where the family allows is built; then, in fp32:

(a) the split model (embedder, layers, final norm, head, through the code every stage runs) must give the HF
    model's logits, on a plain row and on a row of two packed examples;
(b) the exit exported at a shallow depth (layer 0 and LL, see :func:`check_plan`), loaded back with
    ``AutoModelForCausalLM``, must give the logits of the HF model whose skipped layers are replaced by the identity.

Any difference refuses the family in one line naming it and what differed. A family is never trusted because
its module names look usual. The verdict is remembered per config shape, transformers and torch versions and the
source of this package (:func:`core_source_hash`), so a fix or a regression of the code it checks is checked anew.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segprop_ray.core.assemble import exit_config, exit_state_dict, write_model_dir
from segprop_ray.core.hf_compat import (layer_returns_tuple, model_from_config, pretrained, quiet_transformers,
                                         transformers_version)
from segprop_ray.core.layout import UnsupportedArchitecture
from segprop_ray.core.parts import ModelParts, SegmentSpec
from segprop_ray.core.plan import SegPropPlan, exit_is_tied, split_exit_weights
from segprop_ray.core.self_check_config import small_config
from segprop_ray.core.weights import DictSource

TOLERANCE = 1e-5
"""Largest difference accepted, relative to the largest logit (fp32 kernels may differ in their last bits; every
supported family reproduces its logits exactly)."""
WEIGHT_SCALE = 2.0
"""Matrices ~ N(0, (WEIGHT_SCALE / sqrt(width))^2): large enough for peaked attention, so that what a layer's index or
a mask changes shows."""
SEQ = 12
ENVIRONMENT_ERRORS = (OSError, ImportError, MemoryError)
"""Failures of the machine rather than of the family (a full disk, a missing package): refused, never remembered."""


def check_model_family(config: Any, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Run (or recall) the self-check for ``config``; one-line :class:`UnsupportedArchitecture` on a difference."""
    family = getattr(config, "model_type", type(config).__name__)
    if getattr(config, "output_router_logits", False):
        raise UnsupportedArchitecture(f"model family {family}: the router's auxiliary loss (output_router_logits: "
                                      "true) is not supported; set output_router_logits to false in config.json")
    small = small_config(config)
    key = _cache_key(small)
    cached = _recall(cache_dir, key)
    if cached is None:
        with quiet_transformers():
            cached = _verdict(small)
        if cached.pop("remember", True):
            _remember(cache_dir, key, cached)
    if not cached["ok"]:
        raise UnsupportedArchitecture(cached["problem"])
    return cached


def _verdict(small: Any) -> dict[str, Any]:
    family = small.model_type
    try:
        torch.manual_seed(0)
        model = _random_model(small)
        plan = check_plan(small.num_hidden_layers)
        split = _split_difference(model, small)
        exit_ = _exit_difference(model, small, plan)
    except UnsupportedArchitecture as error:
        return {"ok": False, "problem": str(error)}
    except Exception as error:  # noqa: BLE001 - any failure to reproduce the family is a refusal, in one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return {"ok": False, "problem": f"model family {family} failed the split self-check: {type(error).__name__}: "
                                        f"{first}", "remember": not isinstance(error, ENVIRONMENT_ERRORS)}
    for what, (diff, scale), why in (
            ("the split model's logits differ from the HF model's", split,
             "its forward does something the split does not"),
            ("the exported shallow exit's logits differ from the identity-skipped HF model's", exit_,
             "an exported exit would not compute the exit that was scored: its layers depend on their index in a "
             "way core/assemble.py does not renumber")):
        if diff > TOLERANCE * max(scale, 1.0):
            return {"ok": False, "problem": f"model family {family} is not supported: {what} by {diff:.3g} (logits "
                                            f"up to {scale:.3g}), so {why}"}
    return {"ok": True, "family": family, "split_diff": split[0], "exit_diff": exit_[0],
            "layers": small.num_hidden_layers, "exit_layers": plan.exit_layers(0), "transformers": transformers_version()}


def check_plan(num_layers: int) -> SegPropPlan:
    """The plan whose exit at depth 0 the check exports: layer 0 and LL = the last 2 layers, or as many as a model of
    ``num_layers`` layers can have beside a middle layer (3 layers: LL = layer 2; 2: none; 1: the whole model, as
    ``e2e`` runs it), so that every model some run's plan accepts can be checked, with real LL layers where it has
    them."""
    if num_layers < 2:
        return SegPropPlan(num_layers, num_layers - 1, 0, "e2e")
    return SegPropPlan(num_layers, 0, min(2, num_layers - 2))


def _random_model(config: Any) -> nn.Module:
    """The HF model of ``config`` in fp32 eval mode, with weights large enough to show differences (HF's init is not):
    matrices ~ N(0, (WEIGHT_SCALE / sqrt(last dim))^2), vectors 1 + 0.1 N(0, 1) for norms, 0.1 N(0, 1) otherwise."""
    model = model_from_config(config, torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, WEIGHT_SCALE * param.shape[-1] ** -0.5)
            elif "norm" in name:
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.1)
    return model


def _inputs(config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of token ids and their positions: one sequence, and two packed examples (positions restart)."""
    ids = torch.randint(0, config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))  # (2, T)
    positions = torch.stack([torch.arange(SEQ), torch.cat([torch.arange(5), torch.arange(SEQ - 5)])])  # (2, T)
    return ids, positions


def _split_difference(model: nn.Module, config: Any) -> tuple[float, float]:
    parts = ModelParts(config)
    source = DictSource(model.state_dict())
    layers = [(i, source) for i in range(parts.num_layers)]
    segment = parts.segment(SegmentSpec(layers, source, source, tie_head=parts.tied)).eval()
    ids, positions = _inputs(config)
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=positions, use_cache=False).logits  # (2, T, V): no cache, as in training
        got = segment.logits(ids, position_ids=positions)
    return float((got - expected).abs().max()), float(expected.abs().max())


def _exit_difference(model: nn.Module, config: Any, plan: SegPropPlan) -> tuple[float, float]:
    """The exit at depth 0 of ``plan`` (layer 0, then LL) exported and loaded, against the HF model whose other
    layers are the identity."""
    parts = ModelParts(config)
    kept = plan.exit_layers(0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    committed, exit_weights = split_exit_weights(state, parts.layout, plan)
    exit_state = exit_state_dict(plan, parts.layout, 0, committed, exit_weights, tied=exit_is_tied(plan, 0, parts.tied))
    ids, _ = _inputs(config)
    with tempfile.TemporaryDirectory() as directory:
        write_model_dir(directory, exit_config(config, plan, 0), exit_state)
        exported = pretrained(directory, torch.float32).eval()
        skipped = _identity_skipped(model, parts, kept)
        with torch.no_grad():
            expected, got = skipped(input_ids=ids, use_cache=False).logits, exported(input_ids=ids, use_cache=False).logits
    return float((got - expected).abs().max()), float(expected.abs().max())


class _Identity(nn.Module):
    """A decoder layer that returns its input (the shape of output the installed transformers expects)."""

    def __init__(self, replaced: nn.Module):
        super().__init__()
        self.as_tuple = layer_returns_tuple()
        for name in ("attention_type", "layer_idx", "is_sliding"):  # read by some models' forward loops
            if hasattr(replaced, name):
                setattr(self, name, getattr(replaced, name))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return (hidden_states,) if self.as_tuple else hidden_states


def _identity_skipped(model: nn.Module, parts: ModelParts, kept: list[int]) -> nn.Module:
    skipped = copy.deepcopy(model)
    layers = skipped.get_submodule(parts.layout.layers)
    for index in range(len(layers)):
        if index not in kept:
            layers[index] = _Identity(layers[index])
    return skipped


def _cache_key(config: Any) -> str:
    text = json.dumps({"config": config.to_dict(), "transformers": transformers_version(), "torch": torch.__version__,
                       "code": core_source_hash()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def core_source_hash(directory: str | Path = Path(__file__).parent) -> str:
    """sha256 of the Python sources under ``directory`` (default: this package, whose code the check exercises),
    read once per process: a verdict is never recalled across a change of that code."""
    digest = hashlib.sha256()
    root = Path(directory)
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _recall(cache_dir: str | Path | None, key: str) -> dict[str, Any] | None:
    path = Path(cache_dir) / "self-check" / f"{key}.json" if cache_dir else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _remember(cache_dir: str | Path | None, key: str, verdict: dict[str, Any]) -> None:
    if not cache_dir:
        return
    path = Path(cache_dir) / "self-check" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{id(verdict)}.tmp")
    temporary.write_text(json.dumps(verdict))
    temporary.replace(path)
