"""The adapter settings of a run (``segprop.adapter``): LoRA through PEFT, with its names and defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from segprop_ray.config.training import Strict
from segprop_ray.core.adapter_spec import LoraSpec


class AdapterConfig(Strict):
    """LoRA adapters (through PEFT, with ``LoraConfig``'s names and defaults) trained instead of full weights."""

    type: Literal["lora"] = "lora"
    """The adapter kind (LoRA)."""
    r: int = Field(8, ge=1)
    """Rank of the low-rank update."""
    alpha: float = Field(8.0, gt=0)
    """PEFT's ``lora_alpha``: the update is scaled by ``alpha / r``."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """PEFT's ``lora_dropout``: dropout on each adapter's input while training."""
    target_modules: list[str] | str | None = None
    """Linear modules of the decoder layers that get adapters, as PEFT reads them: names matched against the end of
    each module's path (``[q_proj, v_proj]``), ``all-linear``, or a regular expression matched against the whole path
    (``model.layers.*.mlp.*``); None: PEFT's default for the family (``q_proj``, ``v_proj`` for Llama). The
    embedding and the LM head never get adapters (they stay frozen)."""

    def spec(self) -> LoraSpec:
        """The adapter as the core reads it."""
        targets = tuple(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        return LoraSpec(self.r, self.alpha, self.dropout, targets)
