"""Training hyper-parameters, named as in Hugging Face's ``TrainingArguments``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SchedulerName = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
]


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, field docstrings are descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class TrainingConfig(Strict):
    """One segment's optimisation, with the semantics of HF ``TrainingArguments``.

    A "step" is an optimizer step: ``gradient_accumulation_steps`` micro-batches of
    ``per_device_train_batch_size`` blocks on each data-parallel worker.
    """

    learning_rate: float = Field(5e-5, ge=0)
    """Peak learning rate of AdamW (0 makes every stage the identity)."""
    num_train_epochs: float = Field(1.0, gt=0)
    """Passes over the training blocks per segment, used when ``max_steps`` is not positive."""
    max_steps: int = -1
    """Optimizer steps per segment; a positive value overrides ``num_train_epochs``."""
    per_device_train_batch_size: int = Field(8, ge=1)
    """Blocks per micro-batch on each worker."""
    per_device_eval_batch_size: int = Field(8, ge=1)
    """Blocks per evaluation batch."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches whose gradients are summed before one optimizer step."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Gradient clipping norm; 0 disables clipping."""
    lr_scheduler_type: SchedulerName = "linear"
    """Learning-rate schedule after warmup (names of ``transformers.get_scheduler``)."""
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    """Fraction of the segment's steps spent warming up linearly from 0."""
    warmup_steps: int = Field(0, ge=0)
    """Warmup steps; a positive value overrides ``warmup_ratio``."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay, on every weight except biases and normalisation layers' weights, as HF's Trainer does."""
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW beta1."""
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    """AdamW beta2."""
    adam_epsilon: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    bf16: bool = False
    """bf16 autocast around forward and loss where the device supports it; weights stay fp32."""
    seed: int = 42
    """Seed of data order and dropout; the same seed gives the same weights."""
    eval_steps: int = Field(0, ge=0)
    """Evaluate every this many steps (0: only at the end of the segment)."""
    logging_steps: int = Field(10, ge=1)
    """Record the training loss every this many steps."""
    save_steps: int = Field(50, ge=1)
    """Write a resumable checkpoint every this many steps."""
    loss_chunk_tokens: int = Field(0, ge=0)
    """Tokens per chunk of the LM-head loss: only one chunk's logits exist at a time (0: as many as make
    1 GiB of fp32 logits, 2,092 tokens at a 128k vocabulary). Smaller saves memory, larger saves time."""
    head_loss: Literal["auto", "chunked", "fused"] = "auto"
    """How the LM-head loss is computed: ``chunked`` (a chunk of tokens at a time, ``loss_chunk_tokens``; the CPU
    path and the reference), ``fused`` (Liger Kernel's fused linear + cross-entropy on CUDA: no logits chunk workspace;
    needs ``segprop_ray[cuda]``; falls back to chunked for logit math the kernel cannot express), or ``auto``: fused
    on CUDA when the kernel imports, else chunked. Both give the same loss within bf16 rounding."""
    optim: Literal["adamw_torch", "adamw_8bit"] = "adamw_torch"
    """The optimizer, with HF's names: ``adamw_torch`` (torch's AdamW, fused on CUDA) or ``adamw_8bit``
    (bitsandbytes' 8-bit AdamW: 2 bytes of optimizer state per parameter instead of 8; CUDA only, needs
    ``segprop_ray[cuda]``)."""
    max_eval_blocks: int = Field(0, ge=0)
    """Evaluate on at most this many blocks during training (0: all); final exit metrics use all."""
    load_best_model_at_end: bool | None = None
    """End every iteration with the weights of its best evaluation (lowest eval loss among the evaluations at
    steps > 0), not its last step's: the layer, head and LL committed and kept as the exit are the best step's.
    None: on when ``eval_steps`` > 0 (as the paper ran it), else off (evaluating only at the end, they are the same)."""

    @property
    def keeps_best(self) -> bool:
        """``load_best_model_at_end`` as it applies: the setting, or whether ``eval_steps`` > 0 when unset."""
        return self.eval_steps > 0 if self.load_best_model_at_end is None else self.load_best_model_at_end

    @model_validator(mode="after")
    def _has_budget(self) -> "TrainingConfig":
        if self.max_steps == 0:
            raise ValueError("max_steps is 0: set a positive value, or -1 to use num_train_epochs")
        return self


TRAINING_FIELDS = frozenset(TrainingConfig.model_fields)
