"""Multiple-choice accuracy by log-likelihood: which answer option does the model find most likely?

For every item and option, the prompt (:func:`format_prompt`) followed by the option's continuation
(``" " + option text``) is run through the model, and the log-probabilities of the continuation's
tokens given everything before them are summed. The prediction is the option with the largest sum
(``accuracy``); ``accuracy_norm`` uses the mean per continuation token instead (length-normalised,
which favours long options less). Ties go to the first option.

Works with anything that maps token ids ``(B, T)`` to logits ``(B, T, V)``: a Hugging Face model,
a split :class:`~segprop_ray.core.stack.Segment` with embedder and head, or a plain function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from segprop_ray.core.stack import Segment
from segprop_ray.reporting.mc_items import (MCItem, PromptStyle, chat_messages, continuation, format_prompt,
                                            load_mc_items, parse_item)

__all__ = ["MCItem", "load_mc_items", "parse_item", "format_prompt", "score_items", "logits_fn_of",
           "evaluate_exit_mc"]

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Sequence:
    """Prompt + one option's continuation as token ids; the continuation is ``ids[start:]``."""

    item: int
    choice: int
    ids: list[int]
    start: int


def encode_option(tokenizer: Any, prompt: str, option: str, max_length: int | None = None,
                  rendered: bool = False) -> tuple[list[int], int]:
    """``(ids, start)``: the tokens of prompt + continuation, and where the continuation starts.

    The pair is tokenized as one text, so merges across the boundary come out as the model saw them
    in training; when the prompt's own tokens are not a prefix of that, the continuation is tokenized
    on its own. Over ``max_length``, the prompt is cut from the left. ``rendered``: the prompt is a rendered chat
    template (it holds its special tokens as text: none is added), and the continuation is the option's text as is.
    """
    special, tail_text = (False, option) if rendered else (True, continuation(option))
    context = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    whole = tokenizer(prompt + tail_text, add_special_tokens=special)["input_ids"]
    if whole[: len(context)] == context and len(whole) > len(context):
        tail = whole[len(context):]
    else:
        tail = tokenizer(tail_text, add_special_tokens=False)["input_ids"]
    if not tail:
        raise ValueError(f"option {option!r} tokenizes to nothing")
    if max_length is not None and len(context) + len(tail) > max_length:
        context = context[len(context) + len(tail) - max_length:]
    if not context:
        raise ValueError(f"the prompt leaves no context token before option {option!r} (max_length {max_length})")
    return context + tail, len(context)


def _sequences(tokenizer: Any, items: Sequence[MCItem], shots: Sequence[MCItem], max_length: int | None,
               style: PromptStyle, system: str | None = None) -> list[_Sequence]:
    sequences = []
    for index, item in enumerate(items):
        prompt = _prompt(tokenizer, item, shots, style, system)
        for choice, option in enumerate(item.choices):
            ids, start = encode_option(tokenizer, prompt, option, max_length, rendered=style == "chat")
            sequences.append(_Sequence(index, choice, ids, start))
    return sequences


def _prompt(tokenizer: Any, item: MCItem, shots: Sequence[MCItem], style: PromptStyle, system: str | None) -> str:
    if style != "chat":
        return format_prompt(item, shots, style)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("evaluation.prompt_style chat needs a tokenizer with a chat template")
    return tokenizer.apply_chat_template(chat_messages(item, shots, system), tokenize=False, add_generation_prompt=True)


def continuation_logprobs(logits_fn: LogitsFn, batch: list[_Sequence], pad_id: int) -> list[tuple[float, int]]:
    """``(sum of log-probs, token count)`` of each sequence's continuation, from one right-padded forward.

    Right padding is safe for a causal model: position t only sees positions <= t, and only real
    positions are read.
    """
    width = max(len(seq.ids) for seq in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    for row, seq in enumerate(batch):
        input_ids[row, : len(seq.ids)] = torch.tensor(seq.ids)
    with torch.inference_mode():
        logits = logits_fn(input_ids)  # (B, T, V)
    results = []
    for row, seq in enumerate(batch):
        predicting = logits[row, seq.start - 1: len(seq.ids) - 1].float().cpu()  # (C, V): position t predicts t+1
        targets = input_ids[row, seq.start: len(seq.ids)]  # (C,)
        logprobs = torch.log_softmax(predicting, dim=-1).gather(1, targets[:, None])  # (C, 1)
        results.append((float(logprobs.sum()), len(targets)))
    return results


def score_items(logits_fn: LogitsFn, tokenizer: Any, items: Sequence[MCItem], shots: Sequence[MCItem] = (),
                batch_size: int = 8, max_length: int | None = None, style: PromptStyle = "mmlu",
                system: str | None = None) -> dict[str, Any]:
    """Accuracy of ``logits_fn`` on ``items`` (``shots`` solved before each question, prompts in ``style``).

    ``batch_size`` counts (prompt, option) sequences per forward call; sequences are grouped by
    length to pad little. Returns ``accuracy`` (argmax of the summed log-probs), ``accuracy_norm``
    (argmax of the mean log-prob per continuation token), ``n``, ``predictions`` and
    ``predictions_norm`` (chosen option per item), and ``logprob_sums`` / ``logprob_means``
    (per item, per option).
    """
    if not items:
        raise ValueError("no multiple-choice items to score")
    sequences = sorted(_sequences(tokenizer, items, shots, max_length, style, system), key=lambda s: -len(s.ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums = [[0.0] * len(item.choices) for item in items]
    means = [[0.0] * len(item.choices) for item in items]
    for first in range(0, len(sequences), batch_size):
        batch = sequences[first: first + batch_size]
        for seq, (total, count) in zip(batch, continuation_logprobs(logits_fn, batch, pad_id)):
            sums[seq.item][seq.choice], means[seq.item][seq.choice] = total, total / count
    predictions, predictions_norm = [_argmax(row) for row in sums], [_argmax(row) for row in means]
    answers = [item.answer for item in items]
    return {
        "accuracy": _share_equal(predictions, answers), "accuracy_norm": _share_equal(predictions_norm, answers),
        "n": len(items), "predictions": predictions, "predictions_norm": predictions_norm,
        "logprob_sums": sums, "logprob_means": means,
    }


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first option on ties


def _share_equal(predicted: list[int], answers: list[int]) -> float:
    return sum(p == a for p, a in zip(predicted, answers)) / len(answers)


def logits_fn_of(model: nn.Module | LogitsFn) -> LogitsFn:
    """A ``(B, T) ids -> (B, T, V) logits`` function for an HF model, a :class:`Segment` with a head, or a callable.

    Token ids are moved to the device of the module (also for a bound method such as
    ``segment.logits``); an HF output's ``.logits`` is taken. The module's train/eval mode is left as
    it is (call ``model.eval()`` first where it has dropout).
    """
    owner = model if isinstance(model, nn.Module) else getattr(model, "__self__", None)
    if not isinstance(owner, nn.Module):
        return model
    device = next(owner.parameters()).device
    if model is owner and isinstance(model, Segment):
        if model.embedder is None or model.head is None:
            raise ValueError("multiple-choice scoring needs a segment with embedder and LM head (a whole exit model)")
        return lambda ids: model.logits(ids.to(device))

    def on_device(ids: torch.Tensor) -> torch.Tensor:
        output = model(ids.to(device))
        return output.logits if hasattr(output, "logits") else output

    return on_device


def evaluate_exit_mc(model_or_logits_fn: nn.Module | LogitsFn, tokenizer: Any, cfg_evaluation: Any,
                     storage_options: dict[str, Any] | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Score one exit on the configured items (``EvaluationConfig``); ``{}`` when ``mc_path`` is unset.

    Shots: the first ``few_shot`` items of ``mc_dev_path``, or else of ``mc_path`` (those are then
    not scored); the same shots precede every question. ``max_items`` caps the scored items; the
    prompt style is ``prompt_style`` where the config has that field, else ``mmlu``. Returns
    scalars only (no per-item lists, so they fit in ``LayerRecord.metrics``): ``accuracy``,
    ``accuracy_norm``, ``n`` (items scored) and ``few_shot`` (shots per prompt).
    """
    if not cfg_evaluation.mc_path:
        return {}
    items = load_mc_items(cfg_evaluation.mc_path, storage_options)
    shots, items = _split_shots(items, cfg_evaluation, storage_options)
    if cfg_evaluation.max_items:
        items = items[: cfg_evaluation.max_items]
    style, system = cfg_evaluation.prompt_style, getattr(cfg_evaluation, "system_prompt", None)
    result = score_items(logits_fn_of(model_or_logits_fn), tokenizer, items, shots, batch_size, style=style,
                         system=system)
    return {"accuracy": result["accuracy"], "accuracy_norm": result["accuracy_norm"], "n": result["n"],
            "few_shot": len(shots)}


def _split_shots(items: list[MCItem], cfg_evaluation: Any, storage_options: dict[str, Any] | None) -> tuple[list, list]:
    wanted = cfg_evaluation.few_shot
    if cfg_evaluation.mc_dev_path:
        pool = load_mc_items(cfg_evaluation.mc_dev_path, storage_options)
        remaining = items
    else:
        pool, remaining = items, items[wanted:]
    if len(pool) < wanted or not remaining:
        raise ValueError(f"evaluation.few_shot = {wanted} needs more items than the file(s) hold ({len(pool)})")
    return pool[:wanted], remaining
