"""Every transformers call whose signature changed between 4.5x and 5.x lives here, and only here.

- Decoder layers return a tuple in 4.x and a tensor in 5.x, and take different keyword names.
- ``create_causal_mask`` takes ``input_embeds`` + ``cache_position`` in 4.5x, ``inputs_embeds`` in 5.x,
  and does not exist before 4.53 (we then build the mask ourselves).
- ``from_config`` takes ``torch_dtype`` in 4.x and ``dtype`` in 5.x.

The oldest transformers accepted is :data:`MIN_TRANSFORMERS`: before 4.54 ``masking_utils`` does not read packed
``position_ids``, so packed examples would silently attend to each other (:func:`check_transformers_version`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from typing import Any, Iterator

import torch
from torch import nn

try:  # transformers >= 4.53
    from transformers import masking_utils as _masking
except ImportError:  # pragma: no cover - older transformers
    _masking = None

FULL = "full_attention"
SLIDING = "sliding_attention"
MIN_TRANSFORMERS = "4.57"
"""The oldest transformers supported (pyproject.toml's floor): packed-sequence masks appeared in 4.54, and the
project tests 4.57 and 5.x."""


def check_transformers_version(version: str | None = None) -> None:
    """One-line RuntimeError when ``version`` (default: the installed transformers) is older than
    :data:`MIN_TRANSFORMERS`."""
    _check_release(version or transformers_version())


@functools.lru_cache(maxsize=None)
def _check_release(version: str) -> None:
    if _release(version) < _release(MIN_TRANSFORMERS):
        raise RuntimeError(f"transformers {version} is older than {MIN_TRANSFORMERS}, which segprop_ray needs (its "
                           f"masks would let packed examples attend to each other): "
                           f"pip install 'transformers>={MIN_TRANSFORMERS}'")


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as ``4.57.3`` or ``5.0.0rc1``."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


@functools.lru_cache(maxsize=None)
def _accepted_kwargs(fn: Any) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def call_decoder_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Run one HF decoder layer on ``hidden`` (B, T, H) and return its output hidden states."""
    accepted = _accepted_kwargs(type(layer).forward)
    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": False}
    if "position_ids" in accepted:
        kwargs["position_ids"] = position_ids
    if position_embeddings is not None:
        kwargs["position_embeddings"] = position_embeddings
    out = layer(hidden, **{k: v for k, v in kwargs.items() if k in accepted or "kwargs" in accepted})
    return out[0] if isinstance(out, tuple) else out  # 4.x returns (hidden, ...)


def rotary_embeddings(rotary: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor,
                      kinds: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``(cos, sin)`` for each attention kind: one rotary for all (most families), or one per layer type where the
    rotary module takes it (Gemma 3 in transformers 5: local and global RoPE bases)."""
    if "layer_type" in _accepted_kwargs(type(rotary).forward):
        return {kind: rotary(hidden, position_ids, kind) for kind in kinds}
    shared = rotary(hidden, position_ids)
    return {kind: shared for kind in kinds}


def layer_attention_type(config: Any, index: int) -> str:
    """``full_attention`` or ``sliding_attention`` for decoder layer ``index``, as the HF model decides it."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[index]
    return SLIDING if getattr(config, "sliding_window", None) and _uses_global_sliding(config) else FULL


def _uses_global_sliding(config: Any) -> bool:
    # Mistral-style configs without ``layer_types`` slide in every layer when ``sliding_window`` is set;
    # Qwen2-style configs also need ``use_sliding_window``.
    return getattr(config, "use_sliding_window", True) is not False


def attention_masks(
    config: Any, hidden: torch.Tensor, position_ids: torch.Tensor, kinds: set[str]
) -> dict[str, torch.Tensor | None]:
    """The attention mask of each kind for packed, unpadded blocks (``None`` where SDPA's is_causal suffices)."""
    check_transformers_version()
    masks = {}
    for kind in kinds:
        if _masking is not None:
            fn = _masking.create_sliding_window_causal_mask if kind == SLIDING else _masking.create_causal_mask
            masks[kind] = fn(**_mask_kwargs(fn, config, hidden, position_ids))
        else:  # pragma: no cover - transformers < 4.53
            window = getattr(config, "sliding_window", None) if kind == SLIDING else None
            masks[kind] = additive_causal_mask(hidden, window)
    return masks


def _mask_kwargs(fn: Any, config: Any, hidden: torch.Tensor, position_ids: torch.Tensor) -> dict[str, Any]:
    accepted = _accepted_kwargs(fn)
    kwargs: dict[str, Any] = {"config": config, "attention_mask": None, "past_key_values": None}
    kwargs["inputs_embeds" if "inputs_embeds" in accepted else "input_embeds"] = hidden
    if "cache_position" in accepted:  # 4.5x
        kwargs["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
    if "position_ids" in accepted:
        kwargs["position_ids"] = position_ids
    return kwargs


def additive_causal_mask(hidden: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """A (1, 1, T, T) additive mask: 0 where query t may see key s (s <= t, within ``window``), -inf-like elsewhere."""
    t = hidden.shape[1]
    q = torch.arange(t, device=hidden.device)[:, None]
    k = torch.arange(t, device=hidden.device)[None, :]
    allowed = k <= q
    if window:
        allowed &= q - k < window
    mask = torch.zeros(t, t, dtype=hidden.dtype, device=hidden.device)
    mask.masked_fill_(~allowed, torch.finfo(hidden.dtype).min)
    return mask[None, None]  # (1, 1, T, T)


def model_from_config(config: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_config`` with the dtype keyword of the installed transformers."""
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {("dtype" if _is_v5() else "torch_dtype"): dtype}
    return AutoModelForCausalLM.from_config(config, **kwargs)


def make_rotary(rotary_cls: type[nn.Module], config: Any, device: torch.device) -> nn.Module:
    """A fresh rotary-embedding module on ``device`` (its buffers are computed, not stored)."""
    with torch.device(device):
        return rotary_cls(config=config)


def _is_v5() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def pretrained(path: Any, dtype: torch.dtype | None = None) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with the dtype keyword of the installed transformers."""
    from transformers import AutoModelForCausalLM

    kwargs = {} if dtype is None else {("dtype" if _is_v5() else "torch_dtype"): dtype}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def layer_returns_tuple() -> bool:
    """Whether decoder layers return a tuple ``(hidden, ...)`` (transformers 4.x) rather than the hidden states."""
    return not _is_v5()


def transformers_version() -> str:
    """The installed transformers' version."""
    import transformers

    return transformers.__version__


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars and only errors from transformers inside (for internal loads a user did not ask for)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
