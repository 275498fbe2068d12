"""Instruction data end to end in the core: records -> examples -> packed blocks -> the loss HF computes per example.

The eval loss of the split model on packed (or padded) blocks equals HF's loss of each example alone with labels
-100 on the prompt, token-weighted over all completions, for ``prompt_completion`` and ``chat`` records.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from segprop_ray.core.blocks import TARGET, TokenBlocks
from segprop_ray.core.formats import ExampleEncoder, FormatSpec, RecordError
from segprop_ray.core.inprocess import eval_batches
from segprop_ray.core.packing import PACKERS, packer_kind
from segprop_ray.core.parts import ModelParts, SegmentSpec
from segprop_ray.core.step_inputs import evaluate_loss
from segprop_ray.core.weights import SafetensorsSource
from segprop_ray.demo.corpus import generate_chats, generate_instructions
from segprop_ray.demo.tiny_model import build_tokenizer, make_tiny_model

SEQ_LEN = 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama", num_layers=3, hidden=32)


def records(fmt: str) -> list[dict]:
    return generate_instructions(14, seed=4) if fmt == "prompt_completion" else generate_chats(10, seed=5)


def blocks_of(examples, packing: bool) -> TokenBlocks:
    packer = PACKERS[packer_kind("chat", packing)](SEQ_LEN, pad_id=1)
    built = list(packer.add(examples)) + list(packer.finish())
    assert packer.stats.truncated == 0  # HF sees each example whole
    rows = torch.tensor([[b.ids, b.positions, b.kinds] for b in built])  # (N, 3, T)
    return TokenBlocks(rows[:, 0], rows[:, 1], rows[:, 2].to(torch.uint8))


def hf_token_weighted_loss(model, examples) -> float:
    """Each example alone through HF with labels -100 off the targets; the mean over all label tokens."""
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor([example.ids])
            labels = torch.tensor([[i if k == TARGET else -100 for i, k in zip(example.ids, example.kinds)]])
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("fmt", ["prompt_completion", "chat"])
def test_input_model_eval_loss_equals_hf_per_example(model_dir, fmt, packing):
    encoder = ExampleEncoder(build_tokenizer(), FormatSpec(fmt))
    examples = [encoder.encode(r) for r in records(fmt)]
    assert all(e.kinds[0] != TARGET and TARGET in e.kinds for e in examples)
    blocks = blocks_of(examples, packing)
    assert len(blocks) < len(examples) if packing else len(blocks) == len(examples)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    source = SafetensorsSource.from_model_dir(model_dir)
    parts = ModelParts(model.config)
    whole = parts.segment(SegmentSpec([(i, source) for i in range(parts.num_layers)], source, source))
    ours = evaluate_loss(whole, eval_batches(blocks, None, batch_size=3), torch.device("cpu"), bf16=False)
    assert ours == pytest.approx(hf_token_weighted_loss(model, examples), rel=1e-5)


def test_completion_tokens_follow_the_rule_exactly():
    """prompt_ids = tokenizer(prompt).input_ids; completion_ids = tokenizer(completion, no special tokens) + [eos]."""
    tokenizer = build_tokenizer()
    record = {"prompt": "what does the cow say ?", "completion": "the cow says moo ."}
    example = ExampleEncoder(tokenizer, FormatSpec("prompt_completion")).encode(record)
    prompt = tokenizer(record["prompt"]).input_ids
    completion = tokenizer(record["completion"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert example.ids == prompt + completion
    assert example.kinds == [1] * len(prompt) + [2] * len(completion)
    every = ExampleEncoder(tokenizer, FormatSpec("prompt_completion", train_on_prompt=True)).encode(record)
    assert every.ids == example.ids and every.kinds == [1] + [2] * (len(example.ids) - 1)


def test_chat_assistant_turns_are_the_completions_and_match_the_template():
    tokenizer = build_tokenizer()
    chat = generate_chats(1, seed=2, turns=(2, 2))[0]
    example = ExampleEncoder(tokenizer, FormatSpec("chat")).encode(chat)
    assert example.ids == tokenizer.apply_chat_template(chat["messages"], tokenize=True)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(example.ids)
    targets = " ".join(t for t, k in zip(tokens, example.kinds) if k == TARGET)
    answers = [m["content"] for m in chat["messages"] if m["role"] == "assistant"]
    assert targets == " <|end|> ".join(answers) + " <|end|>"  # each answer with its end-of-turn token, nothing else


@pytest.mark.parametrize("fmt,record,problem", [
    ("prompt_completion", {"prompt": "hi"}, "no 'completion' field"),
    ("prompt_completion", {"prompt": "hi", "completion": "  "}, "empty 'completion'"),
    ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, "unknown role 'wizard'"),
    ("chat", {"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
])
def test_bad_records_are_named(fmt, record, problem):
    with pytest.raises(RecordError, match=problem):
        ExampleEncoder(build_tokenizer(), FormatSpec(fmt)).encode(record)


def test_chat_needs_a_template_that_renders_assistant_turns():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(RecordError, match="needs a chat template"):
        ExampleEncoder(tokenizer, FormatSpec("chat"))
    silent = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }} {% endif %}{% endfor %}"
    encoder = ExampleEncoder(tokenizer, FormatSpec("chat"), chat_template=silent)
    with pytest.raises(RecordError, match="renders no assistant tokens"):
        encoder.encode(generate_chats(1)[0])


def test_chat_with_a_slow_tokenizer_is_refused_in_one_line():
    """A slow (Python) tokenizer gives no character offsets, which find the assistant turns; prompt_completion needs
    none and works with it."""
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
    assert not tokenizer.is_fast
    with pytest.raises(RecordError) as refused:
        ExampleEncoder(tokenizer, FormatSpec("chat"))
    assert str(refused.value) == ("data.format chat needs a fast tokenizer (its token offsets find the assistant "
                                  "turns); ByT5Tokenizer is a slow one: give the model a tokenizer.json")
    record = {"prompt": "what does the cow say ?", "completion": "moo"}
    example = ExampleEncoder(tokenizer, FormatSpec("prompt_completion")).encode(record)
    assert example.ids == tokenizer(record["prompt"]).input_ids + tokenizer("moo", add_special_tokens=False).input_ids \
        + [tokenizer.eos_token_id]
