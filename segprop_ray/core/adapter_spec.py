"""What LoRA adapters a run trains, as plain data (the ``segprop.adapter`` config section, without PEFT)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter, with PEFT ``LoraConfig``'s names and defaults: ``W x + (B A x) * alpha / r``."""

    r: int = 8
    """Rank of the update (PEFT's ``r``)."""
    alpha: float = 8.0
    """Scale numerator (PEFT's ``lora_alpha``): the update is multiplied by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training (PEFT's ``lora_dropout``)."""
    target_modules: tuple[str, ...] | str | None = None
    """Linear modules that get adapters, as PEFT reads them: names matched against the end of each module's path
    (``q_proj`` matches ``...self_attn.q_proj``), ``all-linear``, a regular expression matched against the whole
    path, or None for PEFT's default of the model's family (``q_proj``, ``v_proj`` for Llama)."""

    @property
    def scaling(self) -> float:
        """The update's multiplier ``alpha / r``."""
        return self.alpha / self.r
