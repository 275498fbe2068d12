"""Dataset formats, with TRL's names: what a record holds and how it becomes token ids and token kinds.

- ``text``: a document (field ``text``); every token carries loss.
- ``prompt_completion``: fields ``prompt`` and ``completion``. ``prompt_ids = tokenizer(prompt).input_ids``
  (the tokenizer's own special tokens, as it adds them), ``completion_ids = tokenizer(completion,
  add_special_tokens=False).input_ids + [eos]``; the loss is on the completion only unless
  ``train_on_prompt``.
- ``chat``: field ``messages``, a list of ``{role, content}`` rendered with the tokenizer's chat template
  (or ``data.chat_template``) and tokenized as ``apply_chat_template`` does (no special tokens added to
  the rendered text). Every assistant message, with the template's end-of-turn tokens, is a completion;
  everything else is prompt. Assistant tokens are found by rendering the conversation prefix by prefix:
  the text an assistant turn adds after the generation prompt; a template that does not render
  prefix by prefix (earlier turns change when later ones follow) is refused, and so is a slow (Python)
  tokenizer, which cannot tell which characters a token came from.

An example's first token never carries loss (nothing in the example predicts it), so packed examples
never train on each other's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from segprop_ray.core.blocks import CONTEXT, TARGET
from segprop_ray.core.packing import Example

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
"""Message roles a ``chat`` record may use."""


class RecordError(ValueError):
    """A record that cannot be turned into an example (the caller adds where it is)."""


@dataclass(frozen=True)
class FormatSpec:
    """The data settings that decide how a record is read and tokenized."""

    format: str = "text"
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    train_on_prompt: bool = False

    @property
    def field_settings(self) -> dict[str, str]:
        """The record fields this format reads, each with the setting that names it."""
        settings = {"text": ("text_field",), "prompt_completion": ("prompt_field", "completion_field"),
                    "chat": ("messages_field",)}[self.format]
        return {getattr(self, setting): setting for setting in settings}

    @property
    def fields(self) -> tuple[str, ...]:
        """The record fields this format reads."""
        return tuple(self.field_settings)


class ExampleEncoder:
    """Checks records and encodes them as :class:`Example` with one tokenizer (and chat template)."""

    def __init__(self, tokenizer: Any, spec: FormatSpec, chat_template: str | None = None):
        self.tokenizer, self.spec = tokenizer, spec
        self.eos = tokenizer.eos_token_id
        if spec.format != "text" and self.eos is None:
            raise RecordError(f"data.format {spec.format} needs an end-of-sequence token; the tokenizer has none")
        self.template = chat_template or getattr(tokenizer, "chat_template", None)
        if spec.format == "chat" and not self.template:
            raise RecordError("data.format chat needs a chat template: the tokenizer has none; "
                              "set data.chat_template to a Jinja template file")
        if spec.format == "chat" and not getattr(tokenizer, "is_fast", True):
            raise RecordError(f"data.format chat needs a fast tokenizer (its token offsets find the assistant turns); "
                              f"{type(tokenizer).__name__} is a slow one: give the model a tokenizer.json")
        self._encode = FORMATS[spec.format][1]

    def check(self, record: Any) -> None:
        """Raise :class:`RecordError` if ``record`` does not hold this format's fields as it should."""
        check_record(self.spec, record)

    def encode(self, record: dict[str, Any]) -> Example | None:
        """The checked record as an example (None for an empty ``text`` document, which is skipped)."""
        self.check(record)
        example = self._encode(self, record)
        if example is None or self.spec.format == "text":  # a text stream: every token is a target
            return example
        kinds = [TARGET] * len(example.ids) if self.spec.train_on_prompt else example.kinds
        return Example(example.ids, [CONTEXT] + kinds[1:])  # nothing in the example predicts its first token

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool = False) -> str:
        """The conversation as the chat template renders it."""
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=generation_prompt)


def check_record(spec: FormatSpec, record: Any) -> None:
    """Raise :class:`RecordError` if ``record`` does not hold the fields of ``spec.format`` as it should (no tokenizer
    needed: what can be told from the record alone)."""
    if not isinstance(record, dict):
        raise RecordError(f"a record must be an object with {', '.join(spec.fields)}, got {type(record).__name__}")
    missing = [name for name in spec.fields if name not in record]
    if missing:
        raise RecordError(f"no {missing[0]!r} field (it has: {', '.join(list(record)[:8]) or 'none'}); "
                          f"set data.{spec.field_settings[missing[0]]}")
    FORMATS[spec.format][0](spec, record)


def _check_text(spec: FormatSpec, record: dict[str, Any]) -> None:
    value = record[spec.text_field]
    if value is not None and not isinstance(value, str):
        raise RecordError(f"{spec.text_field!r} must be a string, got {type(value).__name__}")


def _encode_text(encoder: ExampleEncoder, record: dict[str, Any]) -> Example | None:
    text = record[encoder.spec.text_field]
    if text is None or not text.strip():
        return None
    ids = encoder.tokenizer(text)["input_ids"] + ([encoder.eos] if encoder.eos is not None else [])
    return Example(ids, [TARGET] * len(ids))


def _check_prompt_completion(spec: FormatSpec, record: dict[str, Any]) -> None:
    for name in (spec.prompt_field, spec.completion_field):
        if not isinstance(record[name], str):
            raise RecordError(f"{name!r} must be a string, got {type(record[name]).__name__} "
                              "(conversations go in data.format chat)")
    if not record[spec.completion_field].strip():
        raise RecordError(f"empty {spec.completion_field!r}: nothing to train on")


def _encode_prompt_completion(encoder: ExampleEncoder, record: dict[str, Any]) -> Example:
    spec, tokenizer = encoder.spec, encoder.tokenizer
    prompt = tokenizer(record[spec.prompt_field])["input_ids"]
    completion = tokenizer(record[spec.completion_field], add_special_tokens=False)["input_ids"] + [encoder.eos]
    return Example(prompt + completion, [CONTEXT] * len(prompt) + [TARGET] * len(completion))


def _check_chat(spec: FormatSpec, record: dict[str, Any]) -> None:
    name = spec.messages_field
    messages = record[name]
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{name!r} must be a non-empty list of {{role, content}} messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RecordError(f"message {index} has no role")
        if message["role"] not in ROLES:
            raise RecordError(f"message {index} has unknown role {message['role']!r} (known: {', '.join(sorted(ROLES))})")
        if not isinstance(message.get("content"), str):
            raise RecordError(f"message {index} ({message['role']}) has no text content")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise RecordError("no assistant message with content: nothing to train on")


def _encode_chat(encoder: ExampleEncoder, record: dict[str, Any]) -> Example:
    messages = [{"role": m["role"], "content": m["content"]} for m in record[encoder.spec.messages_field]]
    text = encoder.render(messages)
    spans = _assistant_spans(encoder, messages, text)
    encoded = encoder.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    kinds = [TARGET if any(a <= start < b for a, b in spans) else CONTEXT for start, _ in encoded["offset_mapping"]]
    if TARGET not in kinds:
        raise RecordError("the chat template renders no assistant tokens")
    return Example(list(encoded["input_ids"]), kinds)


def _assistant_spans(encoder: ExampleEncoder, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """Character spans of ``text`` that each assistant turn adds after its generation prompt."""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = encoder.render(messages[:index], generation_prompt=True) if index else ""
        through = encoder.render(messages[: index + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise RecordError("the chat template does not render the conversation prefix by prefix (an earlier turn "
                              "changes when later ones follow), so its assistant tokens cannot be found")
        if len(through) > len(before):
            spans.append((len(before), len(through)))
    return spans


Checker = Callable[[FormatSpec, dict[str, Any]], None]
Encoder = Callable[[ExampleEncoder, dict[str, Any]], "Example | None"]
FORMATS: dict[str, tuple[Checker, Encoder]] = {
    "text": (_check_text, _encode_text),
    "prompt_completion": (_check_prompt_completion, _encode_prompt_completion),
    "chat": (_check_chat, _encode_chat),
}
"""Per format: how a record is checked, and how it is encoded."""
