"""Where each architecture family keeps its pieces, and what its forward computes outside them: one table, no
``if "llama" in name`` branches.

A decoder-only causal LM is ``embed -> decoder layers -> final norm -> LM head``. The table says, per family
(``config.model_type``), which module paths hold those pieces and which model-level math the HF forward applies
between them (:class:`ModelMath`: an embedding multiplier, a logit multiplier, final logit soft-capping). Every
stage, the chunked loss, the snapshots and the evaluations read that one description. A family without an
entry but with the usual ``model.embed_tokens / model.layers / model.norm / lm_head`` modules is tried with no
extra math; the self-check (:mod:`segprop_ray.core.self_check`) then decides, from a small random copy of the
model, whether the split reproduces the HF forward, and refuses it in one line if not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

ConfigValue = Callable[[Any, nn.Module], "float | None"]
"""``value(config, embedding_module)``: a multiplier the HF forward applies, or None for none."""


def _config_field(name: str) -> ConfigValue:
    return lambda config, _module: getattr(config, name, None)


def _sqrt_hidden_unless_scaled(config: Any, module: nn.Module) -> float | None:
    """Gemma's ``sqrt(hidden_size)``, applied by the model's forward in transformers 4.x and by its embedding
    module (a buffer ``embed_scale``) in 5.x: outside the module only where the module does not scale itself."""
    return None if hasattr(module, "embed_scale") else math.sqrt(config.hidden_size)


@dataclass(frozen=True)
class ModelMath:
    """What a family's HF forward computes between the split modules."""

    embed_scale: ConfigValue | None = None
    """Multiplier of the token embeddings (Gemma: sqrt(hidden); Granite: embedding_multiplier)."""
    embed_scale_in_dtype: bool = False
    """The multiplier is first rounded to the embeddings' dtype (Gemma's ``normalizer``)."""
    logit_scale: ConfigValue | None = None
    """Multiplier of the logits (Cohere: logit_scale)."""
    logit_divisor_field: str | None = None
    """Config field the logits are divided by (Granite: logits_scaling)."""
    softcap_field: str | None = None
    """Config field of the final logit soft-capping ``cap * tanh(logits / cap)`` (Gemma 2 and 3)."""

    def embedding_multiplier(self, config: Any, module: nn.Module) -> float | None:
        """The embedding multiplier of ``config`` (None: none)."""
        value = self.embed_scale(config, module) if self.embed_scale else None
        return None if value in (None, 1, 1.0) else float(value)

    def logit_multiplier(self, config: Any) -> float | None:
        """The logit multiplier of ``config`` (None: none)."""
        value = self.logit_scale(config, None) if self.logit_scale else None
        return None if value in (None, 1, 1.0) else float(value)

    def logit_divisor(self, config: Any) -> float | None:
        """What ``config`` divides the logits by (None: nothing)."""
        value = getattr(config, self.logit_divisor_field, None) if self.logit_divisor_field else None
        return None if value in (None, 1, 1.0) else float(value)

    def softcap(self, config: Any) -> float | None:
        """The final logit soft-cap of ``config`` (None: none)."""
        return getattr(config, self.softcap_field, None) if self.softcap_field else None


@dataclass(frozen=True)
class LayerHalves:
    """Which submodules of a decoder layer (paths inside the layer) form its attention half and its MLP half, each
    with the norms it applies: what a ``granularity: sublayer`` iteration trains of the layer, the rest frozen."""

    attn: tuple[str, ...]
    """Submodules of the attention half (its norm, the attention)."""
    mlp: tuple[str, ...]
    """Submodules of the MLP half. A name a layer lacks is skipped, so one entry can list the names a module has had
    across transformers releases; :func:`check_halves` still requires every parameter to fall in one half."""

    def of(self, part: str) -> tuple[str, ...]:
        """The submodules of half ``part`` (``attn`` or ``mlp``)."""
        return {"attn": self.attn, "mlp": self.mlp}[part]

    def half_of(self, name: str) -> str | None:
        """The half a parameter (its name inside the layer) belongs to, or None if to neither."""
        for part in ("attn", "mlp"):
            if name.startswith(tuple(prefix + "." for prefix in self.of(part))):
                return part
        return None


@dataclass(frozen=True)
class ArchLayout:
    """Module paths of one architecture family, relative to the ``*ForCausalLM`` model, and its model-level math."""

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
    math: ModelMath = field(default_factory=ModelMath)
    """What the HF forward computes outside the split modules."""
    known: bool = True
    """From the table (tested here) rather than assumed from the usual module names."""
    halves: LayerHalves | None = None
    """The attention and MLP halves of a decoder layer (None: not described; ``sublayer`` is refused)."""

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
_SEQUENTIAL_HALVES = LayerHalves(attn=("input_layernorm", "self_attn"), mlp=("post_attention_layernorm", "mlp"))
_MIXTRAL_HALVES = LayerHalves(attn=("input_layernorm", "self_attn"),
                              mlp=("post_attention_layernorm", "mlp", "block_sparse_moe"))
"""Mixtral's MoE block is ``block_sparse_moe`` in transformers 4.x and ``mlp`` in 5.x: both names are its MLP half."""
_GEMMA2_HALVES = LayerHalves(attn=("input_layernorm", "self_attn", "post_attention_layernorm"),
                             mlp=("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm"))
_ROPE_DECODER_HALVES = dict(_ROPE_DECODER, halves=_SEQUENTIAL_HALVES)
_GEMMA_EMBED = dict(embed_scale=_sqrt_hidden_unless_scaled, embed_scale_in_dtype=True)
_GEMMA = ModelMath(**_GEMMA_EMBED, softcap_field="final_logit_softcapping")

LAYOUTS: dict[str, ArchLayout] = {
    **{family: ArchLayout(family, **_ROPE_DECODER_HALVES) for family in
       ("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "qwen3_moe")},
    "mixtral": ArchLayout("mixtral", **_ROPE_DECODER, halves=_MIXTRAL_HALVES),
    "gemma": ArchLayout("gemma", **_ROPE_DECODER_HALVES, math=ModelMath(**_GEMMA_EMBED)),
    "gemma2": ArchLayout("gemma2", **_ROPE_DECODER, math=_GEMMA, halves=_GEMMA2_HALVES),
    "gemma3_text": ArchLayout("gemma3_text", **_ROPE_DECODER, math=_GEMMA, halves=_GEMMA2_HALVES),
    "granite": ArchLayout("granite", **_ROPE_DECODER_HALVES,
                          math=ModelMath(embed_scale=_config_field("embedding_multiplier"),
                                         logit_divisor_field="logits_scaling")),
    "cohere": ArchLayout("cohere", **_ROPE_DECODER, math=ModelMath(logit_scale=_config_field("logit_scale"))),
    "cohere2": ArchLayout("cohere2", **_ROPE_DECODER, math=ModelMath(logit_scale=_config_field("logit_scale"))),
    "gpt2": ArchLayout(
        "gpt2",
        embed="transformer.wte",
        layers="transformer.h",
        norm="transformer.ln_f",
        pos_embed="transformer.wpe",
        embed_dropout="transformer.drop",
        halves=LayerHalves(attn=("ln_1", "attn"), mlp=("ln_2", "mlp")),
    ),
}
"""Cohere's layers run attention and MLP side by side on one shared norm: no halves are described for them."""


class UnsupportedArchitecture(ValueError):
    """The model's architecture cannot be split into embed / layers / norm / head exactly."""


def resolve_layout(model: nn.Module) -> ArchLayout:
    """The layout of ``model`` (a ``*ForCausalLM``), from the table or the generic convention."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    if model_type in LAYOUTS:
        layout = LAYOUTS[model_type]
    else:
        rotary = _ROPE_DECODER["rotary"] if _has_module(model, _ROPE_DECODER["rotary"]) else None
        layout = ArchLayout(model_type, **{**_ROPE_DECODER, "rotary": rotary}, known=False)
    missing = [p for p in (layout.embed, layout.layers, layout.norm, layout.head) if not _has_module(model, p)]
    if missing:
        raise UnsupportedArchitecture(
            f"architecture {arch} ({model_type}) is not supported: no module {', '.join(missing)} "
            "(expected model.embed_tokens / model.layers / model.norm / lm_head or a table entry in core/layout.py)"
        )
    return layout


def check_halves(layout: ArchLayout, layer: nn.Module) -> LayerHalves:
    """The layout's halves, checked against a decoder layer: every parameter in exactly one half. A one-line
    :class:`UnsupportedArchitecture` for a family whose halves are not described (or do not cover the layer)."""
    if layout.halves is None:
        raise UnsupportedArchitecture(f"segprop.granularity sublayer is not supported for {layout.family}: its "
                                      "decoder layer's attention and MLP halves are not described in core/layout.py")
    loose = [name for name, _ in layer.named_parameters() if layout.halves.half_of(name) is None]
    if loose:
        raise UnsupportedArchitecture(f"segprop.granularity sublayer: {layout.family} layer parameters "
                                      f"{', '.join(loose[:3])} belong to neither half described in core/layout.py")
    return layout.halves


def _has_module(model: nn.Module, path: str) -> bool:
    if not path:
        return False
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
