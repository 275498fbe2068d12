"""Where each architecture family keeps its pieces: one table, no ``if "llama" in name`` branches.

A decoder-only causal LM is ``embed -> decoder layers -> final norm -> LM head``. The table says,
per family (``config.model_type``), which module paths hold those pieces. Any model with the usual
``model.embed_tokens / model.layers / model.norm / lm_head`` layout works without an entry; families
known to add something outside those modules (embedding scaling, logit soft-capping) are refused by
name rather than split wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchLayout:
    """Module paths of one architecture family, relative to the ``*ForCausalLM`` model."""

    family: str
    embed: str
    """Token embedding (``nn.Embedding``)."""
    layers: str
    """``nn.ModuleList`` of decoder layers."""
    norm: str
    """Final norm applied before the LM head."""
    head: str = "lm_head"
    """LM head (``nn.Linear`` to the vocabulary)."""
    rotary: str | None = None
    """Rotary embedding module whose ``(cos, sin)`` every layer takes, if the family uses RoPE."""
    pos_embed: str | None = None
    """Learned absolute position embedding added to the token embedding (GPT-2)."""
    embed_dropout: str | None = None
    """Dropout applied to the embedding output, if the family has one."""

    def layer_path(self, index: int) -> str:
        """Path of decoder layer ``index``, e.g. ``model.layers.3``."""
        return f"{self.layers}.{index}"

    def embed_paths(self) -> list[str]:
        """Paths of every module holding embedding weights."""
        return [p for p in (self.embed, self.pos_embed) if p]

    def head_paths(self) -> list[str]:
        """Paths of the modules of the LM head: final norm, then the projection."""
        return [self.norm, self.head]


_ROPE_DECODER = dict(
    embed="model.embed_tokens", layers="model.layers", norm="model.norm", rotary="model.rotary_emb"
)

LAYOUTS: dict[str, ArchLayout] = {
    "llama": ArchLayout("llama", **_ROPE_DECODER),
    "mistral": ArchLayout("mistral", **_ROPE_DECODER),
    "qwen2": ArchLayout("qwen2", **_ROPE_DECODER),
    "qwen3": ArchLayout("qwen3", **_ROPE_DECODER),
    "gpt2": ArchLayout(
        "gpt2",
        embed="transformer.wte",
        layers="transformer.h",
        norm="transformer.ln_f",
        pos_embed="transformer.wpe",
        embed_dropout="transformer.drop",
    ),
}

# Families with the usual module layout whose forward does more than those modules do.
UNSUPPORTED: dict[str, str] = {
    "gemma": "it scales embeddings by sqrt(hidden_size) outside the embedding module",
    "gemma2": "it scales embeddings and soft-caps logits outside the split modules",
    "gemma3": "it scales embeddings and soft-caps logits outside the split modules",
    "gemma3_text": "it scales embeddings and soft-caps logits outside the split modules",
    "cohere": "it scales logits outside the LM head",
    "granite": "it applies embedding and logit multipliers outside the split modules",
}


class UnsupportedArchitecture(ValueError):
    """The model's architecture cannot be split into embed / layers / norm / head."""


def resolve_layout(model: nn.Module) -> ArchLayout:
    """The layout of ``model`` (a ``*ForCausalLM``), from the table or the generic convention."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    if model_type in UNSUPPORTED:
        raise UnsupportedArchitecture(f"architecture {arch} ({model_type}) is not supported: {UNSUPPORTED[model_type]}")
    if model_type in LAYOUTS:
        layout = LAYOUTS[model_type]
    else:
        rotary = _ROPE_DECODER["rotary"] if _has_module(model, _ROPE_DECODER["rotary"]) else None
        layout = ArchLayout(model_type, **{**_ROPE_DECODER, "rotary": rotary})
    missing = [p for p in (layout.embed, layout.layers, layout.norm, layout.head) if not _has_module(model, p)]
    if missing:
        raise UnsupportedArchitecture(
            f"architecture {arch} ({model_type}) is not supported: no module {', '.join(missing)} "
            "(expected model.embed_tokens / model.layers / model.norm / lm_head or a table entry in core/layout.py)"
        )
    return layout


def _has_module(model: nn.Module, path: str) -> bool:
    if not path:
        return False
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
