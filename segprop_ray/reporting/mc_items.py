"""Multiple-choice items in the MMLU layout: loading them (local or any fsspec URI) and the prompt format.

A file is JSONL (one object per line) or Parquet (one item per row) with the fields ``question``
(text), ``choices`` (a list of at least two strings) and ``answer`` (the index of the right choice,
or its letter ``"A"``, ``"B"``, ...). Other fields (``subject``...) are ignored.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

from segprop_ray.storage.fs import redact_uri, resolve_filesystem

LETTERS = string.ascii_uppercase
PromptStyle = Literal["mmlu", "cloze", "chat"]


@dataclass
class MCItem:
    """One question with its answer options; ``answer`` is the index of the right option."""

    question: str
    choices: list[str]
    answer: int


def load_mc_items(path: str, storage_options: dict[str, Any] | None = None) -> list[MCItem]:
    """The items of a JSONL (``.jsonl``/``.json``) or Parquet (``.parquet``) file, local or any fsspec URI.

    A malformed item raises a one-line ``ValueError`` naming the file and the 1-based row (line) number.
    """
    shown = redact_uri(path)
    fs, inner = resolve_filesystem(path, storage_options)
    if not fs.exists(inner):
        raise ValueError(f"multiple-choice file {shown} does not exist")
    suffix = inner.rsplit(".", 1)[-1].lower()
    if suffix == "parquet":
        rows = _parquet_rows(fs, inner)
    elif suffix in ("jsonl", "json"):
        rows = _jsonl_rows(fs, inner, shown)
    else:
        raise ValueError(f"multiple-choice file {shown}: unknown format .{suffix} (use .jsonl or .parquet)")
    items = [parse_item(row, f"{shown} row {number}") for number, row in rows]
    if not items:
        raise ValueError(f"multiple-choice file {shown} holds no items")
    return items


def _jsonl_rows(fs, inner: str, shown: str) -> Iterator[tuple[int, Any]]:
    with fs.open(inner, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{shown} row {number}: not valid JSON ({error.msg})") from None


def _parquet_rows(fs, inner: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    with fs.open(inner, "rb") as handle:
        table = pq.read_table(handle)
    yield from enumerate(table.to_pylist(), start=1)


def parse_item(row: Any, where: str) -> MCItem:
    """One item from a mapping with question / choices / answer; ``where`` names it in errors."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with question, choices, answer")
    missing = [key for key in ("question", "choices", "answer") if key not in row]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}")
    question, choices = row["question"], row["choices"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: question must be a non-empty string")
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError(f"{where}: choices must be a list of at least 2 non-empty strings")
    return MCItem(question, list(choices), _answer_index(row["answer"], len(choices), where))


def _answer_index(answer: Any, num_choices: int, where: str) -> int:
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        index = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    else:
        raise ValueError(f"{where}: answer must be a choice index or a letter A..{LETTERS[num_choices - 1]}, got {answer!r}")
    if not 0 <= index < num_choices:
        raise ValueError(f"{where}: answer {answer!r} is out of range for {num_choices} choices")
    return index


def format_question(item: MCItem, style: PromptStyle = "mmlu") -> str:
    """``mmlu``: ``Question: ...``, one ``A. choice`` line per option, ``Answer:``; ``cloze``: the question alone."""
    if style == "cloze":
        return item.question
    if style != "mmlu":
        raise ValueError(f"unknown prompt style {style!r} (mmlu or cloze; chat prompts need the tokenizer)")
    options = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(item.choices))
    return f"Question: {item.question}\n{options}\nAnswer:"


def continuation(choice: str) -> str:
    """The text scored for an option: a space, then the option's own text."""
    return f" {choice}"


def chat_messages(item: MCItem, shots: Sequence[MCItem] = (), system: str | None = None) -> list[dict[str, str]]:
    """The ``chat`` style prompt as messages: the system message, each shot as a user turn answered by its right
    option, then the question; the scored continuation is the option's text as the assistant's reply."""
    messages = [{"role": "system", "content": system}] if system else []
    for shot in shots:
        messages += [{"role": "user", "content": shot.question},
                     {"role": "assistant", "content": shot.choices[shot.answer]}]
    return messages + [{"role": "user", "content": item.question}]


def format_prompt(item: MCItem, shots: Sequence[MCItem] = (), style: PromptStyle = "mmlu") -> str:
    """The few-shot prompt for ``item``, ending just before the scored continuation.

    In the ``mmlu`` style (the default) each question reads::

        Question: <question>
        A. <choice 0>
        B. <choice 1>
        ...
        Answer:

    Solved shots come first, each followed by its answer and separated by a blank line
    (``...Answer: <right choice text>\\n\\nQuestion: ...``). The scored continuation of option k is
    ``" " + choices[k]`` -- the option's **text**, not its letter. Why the text: the model is asked
    which answer is most likely, and this also works for tokenizers without letters -- with the
    demo's word-level tokenizer, ``A``, ``A.``, ``Question:`` and ``Answer:`` all map to ``<unk>``,
    so letter continuations would all be the same token and every option would tie. The template
    words becoming ``<unk>`` is harmless: they are identical for every option of an item.

    The ``cloze`` style drops the template and the option list: the prompt is the question text
    itself (shots as ``question answer``, blank-line separated), and the option completes it. It
    suits questions that are sentence beginnings ("the cow says" -> " moo") and models never
    shown the MMLU layout, such as the demo's model trained on plain sentences.
    """
    solved = [format_question(shot, style) + continuation(shot.choices[shot.answer]) for shot in shots]
    return "\n\n".join([*solved, format_question(item, style)])
