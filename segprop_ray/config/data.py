"""The ``data`` section: input files, what their records hold, and how they become blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from segprop_ray.config.training import Strict

if TYPE_CHECKING:
    from segprop_ray.core.formats import FormatSpec


class DataConfig(Strict):
    """Where the data comes from, what its records hold (TRL's dataset formats), and how it becomes fixed-length
    blocks."""

    train: str | list[str]
    """Training data: files, directories or globs (local paths or any fsspec URI, e.g. ``s3://``)."""
    eval: str | list[str] | None = None
    """Held-out data; when unset, ``eval_fraction`` of the training blocks is held out instead."""
    eval_fraction: float = Field(0.05, gt=0, lt=1)
    """Share of training blocks held out for evaluation when ``eval`` is unset."""
    seq_len: int = Field(512, ge=8)
    """Tokens per block (``max_length`` in TRL, ``cutoff_len`` in LLaMA-Factory): an example longer than this is
    truncated to its first ``seq_len`` tokens, never split."""
    format: Literal["text", "prompt_completion", "chat"] = "text"
    """What a record holds (TRL's names): ``text`` (a document; every token carries loss, documents are concatenated
    and cut into blocks), ``prompt_completion`` (``prompt`` and ``completion`` strings) or ``chat`` (``messages``: a
    list of ``{role, content}`` rendered with the chat template; every assistant turn is a completion)."""
    file_format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    """How the files are stored; ``auto`` picks by extension (.jsonl/.json, .parquet, anything else is plain text:
    one document per non-empty line, ``format: text`` only)."""
    text_field: str = "text"
    """Record field holding the document (``format: text``; TRL's ``dataset_text_field``)."""
    prompt_field: str = "prompt"
    """Record field holding the prompt (``format: prompt_completion``)."""
    completion_field: str = "completion"
    """Record field holding the completion (``format: prompt_completion``)."""
    messages_field: str = "messages"
    """Record field holding the conversation (``format: chat``)."""
    chat_template: str | None = None
    """A Jinja chat template file (local path or fsspec URI) used instead of the tokenizer's own (``format: chat``)."""
    train_on_prompt: bool = False
    """Also train on prompt tokens (LLaMA-Factory's name). Off: the loss is on completions (assistant turns) only,
    as TRL's ``completion_only_loss``/``assistant_only_loss`` do."""
    packing: bool = True
    """Pack whole examples into blocks, each example attending only to itself with positions from 0 (a
    block-diagonal causal mask), so shards keep a fixed size with little padding. Off: one example per block,
    padded, batched by length (HF's ``group_by_length``). For ``format: text``, on concatenates documents
    (continued pretraining, HF's ``group_texts``); off puts one document per block."""
    max_train_blocks: int | None = Field(None, ge=1)
    """Keep at most this many training blocks (None: all)."""
    max_eval_blocks: int | None = Field(None, ge=1)
    """Keep at most this many evaluation blocks (None: all)."""
    shuffle: bool = True
    """Shuffle block order each epoch (deterministically, from ``training.seed`` and the epoch)."""

    @field_validator("format", mode="before")
    @classmethod
    def _format_is_the_dataset_format(cls, value: Any) -> Any:
        if value in ("auto", "jsonl", "parquet"):
            raise ValueError(f"data.format names what records hold (text, prompt_completion, chat); {value!r} is a "
                             f"file format: set data.file_format: {value}")
        return value

    @model_validator(mode="after")
    def _template_needs_chat(self) -> "DataConfig":
        if self.chat_template is not None and self.format != "chat":
            raise ValueError(f"data.chat_template is only read with data.format chat (format is {self.format})")
        if self.format != "text" and self.file_format == "text":
            raise ValueError(f"data.format {self.format} needs records with fields (JSONL or Parquet), "
                             "not plain text lines")
        return self

    def format_spec(self) -> "FormatSpec":
        """The settings the example encoder reads."""
        from segprop_ray.core.formats import FormatSpec

        return FormatSpec(self.format, self.text_field, self.prompt_field, self.completion_field,
                          self.messages_field, self.train_on_prompt)
