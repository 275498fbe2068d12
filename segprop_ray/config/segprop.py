"""The ``segprop`` section of a run config: the mode, the layers of the base prefix and of LL, the Stage 2 segments
and the adapter, with the settings each mode uses as data (a setting a mode does nothing with is refused)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from segprop_ray.config.adapter import AdapterConfig
from segprop_ray.config.training import Strict
from segprop_ray.core.adapter_spec import LoraSpec
from segprop_ray.core.plan import MODES

USED_BY: dict[str, tuple[str, ...]] = {
    "base_depth": ("segprop", "lw"),
    "last_layers": ("segprop",),
    "segment_layers": ("segprop", "lw"),
    "granularity": ("segprop", "lw"),
    "ll_baseline": ("segprop", "lw"),
}
"""Settings of the segmented algorithm -> the modes that use them. Set in another mode (to other than its default: a
config travels to the workers with every field written out, so a value equal to the default cannot be told from one
left out), a setting would do nothing and is refused."""

WHY_UNUSED: dict[str, str] = {
    "lw": "its LL is the LM head alone (r = 0)",
    "e2e": "it trains every layer at once, with no base prefix, LL or Stage 2",
    "lora": "it trains LoRA adapters on every layer at once, with no base prefix, LL or Stage 2",
}
"""Why a mode ignores the settings :data:`USED_BY` does not list for it, for the refusal."""

ADAPTER_REFUSED: dict[str, str] = {
    "e2e": "use mode lora for end-to-end LoRA fine-tuning",
    "lw": "lw's LL is the LM head alone, which adapters leave frozen, so only the segment's adapters would train, "
          "against the input model's head; use mode segprop (adapters on the segment and LL's layers) or leave "
          "segprop.adapter out",
}
"""Modes that refuse ``segprop.adapter`` -> what to do instead."""


def unused_settings(mode: str) -> list[str]:
    """The settings of :data:`USED_BY` that ``mode`` does nothing with."""
    return [name for name, modes in USED_BY.items() if mode not in modes]


class SegPropConfig(Strict):
    """The algorithm: which layers form the base prefix, which form LL, how Stage 2 is segmented, and which mode
    runs."""

    mode: Literal["segprop", "lw", "e2e", "lora"] = "segprop"
    """``segprop`` (the paper), ``lw`` (layer-wise, LM head only, i.e. r = 0), ``e2e`` (full fine-tuning) or
    ``lora`` (end-to-end LoRA fine-tuning: ``adapter``, PEFT's default LoRA when unset)."""
    base_depth: int = Field(0, ge=0)
    """p: Stage 1 trains decoder layers 0..p (inclusive) with LL; Stage 2 starts at layer p + 1 (``segprop`` and
    ``lw`` only)."""
    last_layers: int = Field(2, ge=0)
    """r: decoder layers in LL (the last r layers, plus final norm and LM head); ``segprop`` only (``lw`` is r = 0)."""
    ll_baseline: Literal["input", "stage1"] = "input"
    """Weights LL's decoder layers are reset to at the start of every Stage 2 iteration:
    the input model's (``input``) or those trained in Stage 1 (``stage1``)."""
    segment_layers: int = Field(1, ge=1)
    """k: consecutive middle layers each Stage 2 iteration trains together with LL (the last segment may be
    shorter). Snapshots and exits exist only at segment boundaries; k times fewer Ray Train start-ups for k times
    the trainable set."""
    granularity: Literal["layer", "sublayer"] = "layer"
    """``sublayer``: every middle layer is two Stage 2 iterations, its attention half then its MLP half (each with
    its norm; the other half frozen), both reading the same snapshot (needs ``segment_layers`` 1)."""
    adapter: AdapterConfig | None = None
    """LoRA adapters trained in Stage 1 and every Stage 2 iteration instead of full weights, merged into the
    committed layers and exits (``mode: lora``: the adapter of the LoRA baseline). Not with ``e2e`` (use ``lora``)
    or ``lw`` (whose LL, the LM head alone, adapters leave frozen)."""

    def adapter_spec(self) -> LoraSpec | None:
        """The adapter the run trains: ``adapter``, PEFT's default LoRA in ``lora`` mode when unset, else None."""
        if self.adapter is not None:
            return self.adapter.spec()
        return LoraSpec() if self.mode == "lora" else None

    @model_validator(mode="after")
    def _settings_fit_the_mode(self) -> "SegPropConfig":
        for name in unused_settings(self.mode):
            value = getattr(self, name)
            if value != type(self).model_fields[name].default:
                raise ValueError(f"{name} = {value} does nothing in mode {self.mode}: "
                                 f"{WHY_UNUSED[self.mode]}; leave it out")
        if self.adapter is not None and self.mode in ADAPTER_REFUSED:
            raise ValueError(f"adapter with mode {self.mode}: {ADAPTER_REFUSED[self.mode]}")
        if self.granularity == "sublayer" and self.segment_layers != 1:
            raise ValueError("granularity sublayer trains the halves of one layer at a time: it needs segment_layers 1")
        return self

    @property
    def effective_last_layers(self) -> int:
        """r as the algorithm uses it: 0 in ``lw`` mode (and in the end-to-end modes)."""
        return self.last_layers if MODES[self.mode].uses_last_layers else 0
