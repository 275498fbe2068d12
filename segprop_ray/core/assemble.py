"""Assembling a standard Hugging Face model directory at any exit depth K.

The model that exits at K is: embeddings, committed layers 0..K, then exit K's LL layers
(renumbered K+1 .. K+r) and its head; ``num_hidden_layers`` is K+1+r and per-layer config lists
(``layer_types``) are cut the same way. A tied model's Stage 1 and E2E exits stay tied (head and
embedding trained as one tensor: ``tie_word_embeddings`` and no separate head weight, as HF saves
them); Stage 2 exits are untied (their head trained while the embedding stayed frozen).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from segprop_ray.core.layout import ArchLayout, UnsupportedArchitecture
from segprop_ray.core.plan import SegPropPlan, exit_is_tied
from segprop_ray.core.weights import save_tensors

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)


def exit_state_dict(
    plan: SegPropPlan,
    layout: ArchLayout,
    depth: int,
    committed: Mapping[str, torch.Tensor],
    exit_weights: Mapping[str, torch.Tensor],
    tied: bool = False,
) -> dict[str, torch.Tensor]:
    """The full state dict of the model exiting at ``depth``, with LL layers renumbered after it; ``tied``
    (see :func:`exit_is_tied`): the head weight is the embedding's and is not stored."""
    keep = tuple(p + "." for p in layout.embed_paths()) + tuple(layout.layer_path(i) + "." for i in range(depth + 1))
    state = {k: v for k, v in committed.items() if k.startswith(keep)}
    renumber = {layout.layer_path(old) + ".": layout.layer_path(depth + 1 + j) + "." for j, old in enumerate(plan.ll_layers)}
    for name, tensor in exit_weights.items():
        for old, new in renumber.items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        state[name] = tensor
    if tied:
        _drop_tied_head(state, layout)
    return state


def _drop_tied_head(state: dict[str, torch.Tensor], layout: ArchLayout) -> None:
    head, embed = f"{layout.head}.weight", f"{layout.embed}.weight"
    if head in state and not torch.equal(state[head], state[embed]):
        raise ValueError(f"a tied exit's {head} differs from {embed}: it was not trained tied")
    state.pop(head, None)


PER_LAYER_LISTS = ("layer_types", "no_rope_layers", "attention_chunk_layers")
"""Config fields holding one value per decoder layer: cut to the kept layers."""
LAYER_INDEX_LISTS = ("mlp_only_layers", "moe_layers")
"""Config fields listing decoder-layer indices: the kept ones, renumbered."""
LAYER_COUNTS = ("first_k_dense_replace",)
"""Config fields counting the first layers of a kind (layers < k): how many of them are kept."""
SPARSE_STEPS = ("decoder_sparse_step",)
"""Config fields making every k-th layer MoE (Qwen-MoE: layer i is sparse iff i is not in ``mlp_only_layers`` and
(i+1) % k == 0). Renumbering would move the pattern, so an exit is written with step 1 and its dense layers listed in
``mlp_only_layers``."""
INDEX_SCALED = ("scale_attn_by_inverse_layer_idx",)
"""Config flags making a layer compute with its own index (GPT-2: attention scaled by 1 / (i+1)): no config of an
exit whose layers are renumbered can keep that, so such an exit is refused."""


def exit_config(config: Any, plan: SegPropPlan, depth: int) -> Any:
    """The HF config of the model exiting at ``depth``: fewer layers, every per-layer field cut and renumbered to
    match (:data:`PER_LAYER_LISTS`, :data:`LAYER_INDEX_LISTS`, :data:`LAYER_COUNTS`, :data:`SPARSE_STEPS`); one-line
    :class:`UnsupportedArchitecture` where renumbered layers cannot keep their computation (:data:`INDEX_SCALED`). A
    family whose layers depend on their index in other ways is caught by the self-check's exported-exit comparison."""
    config = copy.deepcopy(config)
    kept = plan.exit_layers(depth)
    if kept != list(range(len(kept))):
        _refuse_index_scaled(config)
    _sparse_step_as_dense_list(config)
    for name in PER_LAYER_LISTS:
        values = getattr(config, name, None)
        if values is not None and len(values) == config.num_hidden_layers:
            setattr(config, name, [values[i] for i in kept])
    for name in LAYER_INDEX_LISTS:
        if getattr(config, name, None) is not None:
            setattr(config, name, [kept.index(i) for i in getattr(config, name) if i in kept])
    for name in LAYER_COUNTS:
        if getattr(config, name, None) is not None:
            setattr(config, name, sum(1 for i in kept if i < getattr(config, name)))
    if hasattr(config, "n_layer"):  # GPT-2 names it n_layer (num_hidden_layers is an alias)
        config.n_layer = len(kept)
    config.num_hidden_layers = len(kept)
    config.tie_word_embeddings = exit_is_tied(plan, depth, bool(getattr(config, "tie_word_embeddings", False)))
    return config


def _refuse_index_scaled(config: Any) -> None:
    for name in INDEX_SCALED:
        if getattr(config, name, False):
            raise UnsupportedArchitecture(
                f"model family {getattr(config, 'model_type', '?')} is not supported: {name}: true makes each layer "
                "compute with its own index, which an exit exported with renumbered layers cannot keep")


def sparse_step(config: Any, name: str) -> int | None:
    """The step of the :data:`SPARSE_STEPS` field ``name`` where it makes some layers dense (> 1), else None."""
    step = getattr(config, name, None)
    return step if isinstance(step, int) and step > 1 else None


def _sparse_step_as_dense_list(config: Any) -> None:
    """Every dense layer listed in ``mlp_only_layers`` and the step set to 1: the same layers, in a form that
    :data:`LAYER_INDEX_LISTS` renumbers with the kept layers (the rule of transformers' Qwen-MoE decoder layer)."""
    for name in SPARSE_STEPS:
        step = sparse_step(config, name)
        if step:
            dense = set(getattr(config, "mlp_only_layers", None) or [])
            config.mlp_only_layers = sorted(dense | {i for i in range(config.num_hidden_layers) if (i + 1) % step})
            setattr(config, name, 1)


def write_model_dir(
    out_dir: str | Path,
    config: Any,
    state: Mapping[str, torch.Tensor],
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files: a directory ``from_pretrained`` loads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
    if dtype is not None:
        config.torch_dtype = str(dtype).removeprefix("torch.")
    save_tensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return write_model_files(out, config, tokenizer_dir, metadata)


def write_model_files(
    out_dir: str | Path,
    config: Any,
    tokenizer_dir: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Everything of a model directory but its weights: ``config.json``, the tokenizer files, ``segprop.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, out / name)
    if metadata:
        (out / "segprop.json").write_text(json.dumps(metadata, indent=2))
    return out
