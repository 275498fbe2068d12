"""The small copy of a model's config that the self-check builds: few layers, small widths, same structure.

Layers: the shortest prefix that holds every value of every per-layer field (layer types, no-RoPE flags, dense
and MoE layers), and at least 4 (a base layer, a middle layer and 2 last layers) where the model has them.
Widths: the fields of :data:`SMALL` where the config has them (hidden 64, 4 heads of 16, 4 experts), keeping the
grouping ratio of queries to keys and values (:func:`small_kv_heads`: multi-query stays multi-query, never more
key/value heads than heads) and a hidden size that splits into even head widths. Everything else, the model-level
math included, stays as it is.
"""

from __future__ import annotations

import copy
from typing import Any

from segprop_ray.core.assemble import LAYER_COUNTS, LAYER_INDEX_LISTS, PER_LAYER_LISTS, SPARSE_STEPS, sparse_step

MIN_LAYERS = 4
SMALL = {"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
         "num_attention_heads": 4, "head_dim": 16, "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4,
         "num_experts_per_tok": 2, "n_shared_experts": 1, "vocab_size": 256, "sliding_window": 3,
         "attention_chunk_size": 4}
"""Small values of the width fields a config may have (set only where it has them, never larger than its own)."""


def small_config(config: Any) -> Any:
    """A copy of ``config`` with few layers and small widths (see the module docstring)."""
    small = copy.deepcopy(config)
    layers = _layers_needed(config)
    for name in PER_LAYER_LISTS:
        values = getattr(small, name, None)
        if values is not None and len(values) == config.num_hidden_layers:
            setattr(small, name, list(values[:layers]))
    for name in LAYER_INDEX_LISTS:
        if getattr(small, name, None) is not None:
            setattr(small, name, [i for i in getattr(small, name) if i < layers])
    small.num_hidden_layers = layers
    if hasattr(small, "n_layer"):
        small.n_layer = layers
    _shrink_widths(small)
    return small


def _layers_needed(config: Any) -> int:
    n = config.num_hidden_layers
    needed = MIN_LAYERS
    for name in PER_LAYER_LISTS:
        values = getattr(config, name, None)
        if values is not None and len(values) == n:
            needed = max(needed, max(list(values).index(v) for v in set(values)) + 1)
    for name in LAYER_INDEX_LISTS:
        if getattr(config, name, None):
            needed = max(needed, min(getattr(config, name)) + 2)  # one such layer and one other after it
    for name in LAYER_COUNTS:
        if getattr(config, name, None):
            needed = max(needed, getattr(config, name) + 1)
    for name in SPARSE_STEPS:
        step = sparse_step(config, name)
        if step:
            needed = max(needed, step + 1)  # the first sparse layer (index step - 1) and a dense one after it
    return min(needed, n)


def _shrink_widths(small: Any) -> None:
    heads = getattr(small, "num_attention_heads", None)
    kv = getattr(small, "num_key_value_heads", None)
    hidden = getattr(small, "hidden_size", None)
    for name, value in SMALL.items():
        current = getattr(small, name, None)
        if isinstance(current, int) and not isinstance(current, bool) and current > value:
            setattr(small, name, value)
    if heads and kv:
        small.num_key_value_heads = small_kv_heads(heads, kv, small.num_attention_heads)
    if heads and hidden != small.hidden_size and small.hidden_size % (2 * small.num_attention_heads):
        # families without a head_dim field split hidden across the heads, and RoPE halves each head: 3 heads of 16
        small.hidden_size = SMALL["head_dim"] * small.num_attention_heads
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(small, name, None)
        if isinstance(value, int) and value >= small.vocab_size:
            setattr(small, name, 0 if name == "pad_token_id" else None)


def small_kv_heads(heads: int, kv: int, small_heads: int) -> int:
    """Key/value heads for ``small_heads`` query heads that keep the config's grouping ratio ``heads / kv`` (a ratio
    larger than ``small_heads`` becomes multi-query): never more than ``small_heads``, always dividing it."""
    if small_heads == heads:
        return kv  # the heads were not shrunk: the config's own grouping
    per_group = max(1, heads // max(kv, 1))
    small_kv = max(1, small_heads // per_group)
    while small_heads % small_kv:  # a ratio that does not divide the small head count: the next one that does
        small_kv -= 1
    return small_kv
