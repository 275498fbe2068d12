"""Multiple-choice accuracy by log-likelihood: the arithmetic, batching, a trained model, chance level, loading."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from segprop_ray.config.schema import EvaluationConfig
from segprop_ray.demo.corpus import ANIMALS
from segprop_ray.demo.tiny_model import build_tokenizer, tiny_config
from segprop_ray.reporting.mc_eval import (MCItem, evaluate_exit_mc, format_prompt, load_mc_items, logits_fn_of,
                                           score_items)

TOKENIZER = build_tokenizer()
VOCAB = len(TOKENIZER)
RELATIONS = (("is", 0), ("says", 1), ("lives in the", 2))


@pytest.fixture
def one_thread():
    """Tiny models train fastest on one thread (and other jobs may share the CPUs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def bigram_logits_fn(table: torch.Tensor):
    """Logits that depend only on the current token: row ``table[id]``."""
    return lambda ids: table[ids]  # (B, T) -> (B, T, V)


def token_id(word: str) -> int:
    return TOKENIZER.convert_tokens_to_ids(word)


def fact_items(seed: int) -> list[MCItem]:
    """One item per (animal, trait) of the demo corpus, 3 distractors from other animals, shuffled by ``seed``."""
    rng = random.Random(seed)
    items = []
    for relation, trait in RELATIONS:
        for animal, traits in ANIMALS.items():
            right = traits[trait]
            choices = rng.sample([t[trait] for a, t in ANIMALS.items() if a != animal], 3) + [right]
            rng.shuffle(choices)
            items.append(MCItem(f"the {animal} {relation}", choices, choices.index(right)))
    return items


def test_prompt_format_puts_solved_shots_first_and_ends_at_answer():
    shot = MCItem("the cow says", ["woof", "moo"], 1)
    item = MCItem("the cat says", ["meow", "oink", "hoot"], 0)
    expected = ("Question: the cow says\nA. woof\nB. moo\nAnswer: moo\n\n"
                "Question: the cat says\nA. meow\nB. oink\nC. hoot\nAnswer:")
    assert format_prompt(item, [shot]) == expected
    assert TOKENIZER(format_prompt(item, [shot]) + " meow")["input_ids"][-1] == token_id("meow")


def test_cloze_style_is_the_question_completed_by_the_option():
    shot = MCItem("the cow says", ["woof", "moo"], 1)
    item = MCItem("the cat says", ["meow", "oink"], 0)
    assert format_prompt(item, [shot], style="cloze") == "the cow says moo\n\nthe cat says"
    with pytest.raises(ValueError, match="unknown prompt style 'letters'"):
        format_prompt(item, style="letters")


def test_evaluate_exit_mc_uses_the_configured_prompt_style(tmp_path):
    from segprop_ray.config.schema import EvaluationConfig

    path = write_jsonl(tmp_path / "mc.jsonl", [{"question": "the cow says", "choices": ["meow", "moo"], "answer": 1}])

    def moo_only_in_short_prompts(ids: torch.Tensor) -> torch.Tensor:  # the cloze prompt is 3 tokens, mmlu's 9
        bias = torch.zeros(VOCAB)
        bias[token_id("moo" if ids.shape[1] < 6 else "meow")] = 10.0
        return bias.expand(*ids.shape, VOCAB)  # (B, T, V)

    def config(**fields):
        return EvaluationConfig(mc_path=str(path), **fields)

    assert evaluate_exit_mc(moo_only_in_short_prompts, TOKENIZER, config(prompt_style="cloze"))["accuracy"] == 1.0
    assert evaluate_exit_mc(moo_only_in_short_prompts, TOKENIZER, config())["accuracy"] == 0.0  # default: mmlu


def test_log_likelihood_arithmetic_sum_and_mean():
    torch.manual_seed(0)
    table = torch.randn(VOCAB, VOCAB)
    item = MCItem("the cow says", ["brown cow", "moo"], 1)
    result = score_items(bigram_logits_fn(table), TOKENIZER, [item])

    logprobs = torch.log_softmax(table, dim=-1)  # (V, V): row = current token, column = next token
    answer_token = TOKENIZER(format_prompt(item))["input_ids"][-1]  # "Answer:" (<unk> in the word-level vocab)
    brown, cow, moo = token_id("brown"), token_id("cow"), token_id("moo")
    expected_two = float(logprobs[answer_token, brown] + logprobs[brown, cow])
    expected_one = float(logprobs[answer_token, moo])
    assert result["logprob_sums"][0] == pytest.approx([expected_two, expected_one], abs=1e-5)
    assert result["logprob_means"][0] == pytest.approx([expected_two / 2, expected_one], abs=1e-5)
    assert result["predictions"] == [1 if expected_one > expected_two else 0]


def test_sum_and_length_normalised_mean_can_disagree():
    # After any token: brown 0.6, moo 0.4; after "brown": cow 0.6, moo 0.4.
    brown, cow, moo = token_id("brown"), token_id("cow"), token_id("moo")
    probs = torch.full((VOCAB, VOCAB), 1e-9)
    probs[:, brown], probs[:, moo] = 0.6, 0.4
    probs[brown, brown], probs[brown, cow] = 1e-9, 0.6
    item = MCItem("the cow says", ["brown cow", "moo"], 1)
    result = score_items(bigram_logits_fn(probs.log()), TOKENIZER, [item])
    assert result["predictions"] == [1] and result["accuracy"] == 1.0  # sum: 2 log 0.6 < log 0.4
    assert result["predictions_norm"] == [0] and result["accuracy_norm"] == 0.0  # mean: log 0.6 > log 0.4


def test_right_padding_and_batch_size_do_not_change_scores(one_thread):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB, num_layers=2, hidden=32)).eval()
    items = fact_items(3)[:10] + [MCItem("the cow lives in the", ["big red barn by the lake", "pond"], 0)]
    alone = score_items(logits_fn_of(model), TOKENIZER, items, batch_size=1)
    batched = score_items(lambda ids: model(ids).logits, TOKENIZER, items, batch_size=7)
    for one, many in zip(alone["logprob_sums"], batched["logprob_sums"]):
        assert many == pytest.approx(one, abs=1e-4)


def train_on_solved_items(model, items: list[MCItem], steps: int, lr: float = 1e-2) -> None:
    """Teach ``model`` the answer of each solved prompt (loss on the answer token only)."""
    encoded = [TOKENIZER(format_prompt(item) + " " + item.choices[item.answer])["input_ids"] for item in items]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), TOKENIZER.pad_token_id)  # (N, T)
    labels = torch.full_like(input_ids, -100)  # (N, T)
    for row, ids in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(ids) - 1] = ids[-1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_tiny_model_trained_on_the_facts_picks_the_right_answers(one_thread, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", VOCAB, num_layers=2, hidden=32))
    held_out = fact_items(seed=9)  # the same facts, options in an order never trained on
    before = score_items(logits_fn_of(model.eval()), TOKENIZER, held_out)["accuracy"]

    # Five option orders, 150 gentle steps: every initialisation seed tried (0-4) learns the facts, not the positions.
    train_on_solved_items(model.train(), [item for seed in range(1, 6) for item in fact_items(seed)], steps=150, lr=3e-3)
    model.eval()

    assert before < 0.5
    assert score_items(lambda ids: model(ids).logits, TOKENIZER, held_out)["accuracy"] == 1.0
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(vars(item)) + "\n" for item in held_out))
    metrics = evaluate_exit_mc(model, TOKENIZER, EvaluationConfig(mc_path=str(path), max_items=10))
    assert metrics == {"accuracy": 1.0, "accuracy_norm": 1.0, "n": 10, "few_shot": 0}


def test_labels_shuffled_independently_of_content_give_chance_accuracy():
    torch.manual_seed(1)
    logits_fn = bigram_logits_fn(torch.randn(VOCAB, VOCAB) * 3)
    rng = random.Random(0)
    words = [w for w in TOKENIZER.get_vocab() if not w.startswith("<")]
    items = [MCItem(" ".join(rng.sample(words, 3)), rng.sample(words, 4), rng.randrange(4)) for _ in range(400)]

    shuffled = score_items(logits_fn, TOKENIZER, items, batch_size=64)
    # Binomial(400, 1/4): 99.9% two-sided band is 100 +- 3.29 * sqrt(400 * 0.25 * 0.75) = [71.5, 128.5] items.
    assert 71.5 / 400 <= shuffled["accuracy"] <= 128.5 / 400
    assert len(set(shuffled["predictions"])) == 4  # the model does prefer options; they just don't match labels
    aligned = [MCItem(i.question, i.choices, p) for i, p in zip(items, shuffled["predictions"])]
    assert score_items(logits_fn, TOKENIZER, aligned, batch_size=64)["accuracy"] == 1.0


def prefers(word: str):
    """A model that always finds ``word`` far more likely than anything else."""
    bias = torch.zeros(VOCAB)
    bias[token_id(word)] = 10.0
    return lambda ids: bias.expand(*ids.shape, VOCAB)  # (B, T, V)


def write_jsonl(path, items: list[dict]) -> str:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return str(path)


def test_evaluate_exit_mc_skips_the_shots_and_caps_items(tmp_path):
    wrong = {"question": "the cat says", "choices": ["moo", "meow"], "answer": 1}  # the model says moo: wrong
    right = {"question": "the cow says", "choices": ["meow", "moo"], "answer": "B"}
    path = write_jsonl(tmp_path / "mc.jsonl", [wrong, wrong] + [right] * 5)
    model = prefers("moo")
    assert evaluate_exit_mc(model, TOKENIZER, EvaluationConfig(mc_path=path, few_shot=2)) == {
        "accuracy": 1.0, "accuracy_norm": 1.0, "n": 5, "few_shot": 2}
    dev = write_jsonl(tmp_path / "dev.jsonl", [right])
    config = EvaluationConfig(mc_path=path, mc_dev_path=dev, few_shot=1, max_items=3)
    # shots from the dev file: the first items of mc.jsonl are scored now (2 wrong, then 1 right)
    assert evaluate_exit_mc(model, TOKENIZER, config) == {"accuracy": 1 / 3, "accuracy_norm": 1 / 3, "n": 3,
                                                          "few_shot": 1}
    assert evaluate_exit_mc(model, TOKENIZER, EvaluationConfig()) == {}
    with pytest.raises(ValueError, match="few_shot = 2"):
        evaluate_exit_mc(model, TOKENIZER, EvaluationConfig(mc_path=dev, few_shot=2))


def test_load_jsonl_parquet_and_fsspec_uris(tmp_path):
    rows = [{"question": "the cow says", "choices": ["moo", "woof"], "answer": 0, "subject": "farm"},
            {"question": "the dog says", "choices": ["moo", "woof", "oink", "hoot"], "answer": "d"}]
    expected = [MCItem("the cow says", ["moo", "woof"], 0), MCItem("the dog says", ["moo", "woof", "oink", "hoot"], 3)]
    assert load_mc_items(write_jsonl(tmp_path / "mc.jsonl", rows)) == expected
    pq.write_table(pa.Table.from_pylist([{**rows[0]}, {**rows[1], "answer": 3}]), tmp_path / "mc.parquet")
    assert load_mc_items(str(tmp_path / "mc.parquet")) == expected
    import fsspec

    fsspec.filesystem("memory").pipe("/mc/items.jsonl", (tmp_path / "mc.jsonl").read_bytes())
    assert load_mc_items("memory://mc/items.jsonl") == expected


@pytest.mark.parametrize("row, message", [
    ({"question": "q", "choices": ["a", "b"]}, r"missing field\(s\) \['answer'\]"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer 2 is out of range for 2 choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": "E"}, "answer 'E' is out of range"),
    ({"question": "q", "choices": ["a", "b"], "answer": True}, "answer must be a choice index or a letter A..B"),
    ({"question": "q", "choices": "a b", "answer": 0}, "choices must be a list"),
    ({"question": "", "choices": ["a", "b"], "answer": 0}, "question must be a non-empty string"),
])
def test_malformed_item_names_file_and_row(tmp_path, row, message):
    good = {"question": "the cow says", "choices": ["moo", "woof"], "answer": 0}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, row])
    with pytest.raises(ValueError, match=f"bad.jsonl row 3: {message}") as raised:
        load_mc_items(path)
    assert "\n" not in str(raised.value)


def test_invalid_json_line_and_unknown_format(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl row 2: not valid JSON"):
        load_mc_items(str(path))
    (tmp_path / "items.csv").write_text("question,choices,answer\n")
    with pytest.raises(ValueError, match=r"unknown format \.csv"):
        load_mc_items(str(tmp_path / "items.csv"))
    with pytest.raises(ValueError, match="does not exist"):
        load_mc_items(str(tmp_path / "missing.jsonl"))


def test_split_segment_bound_logits_and_hf_model_score_the_same(one_thread, tmp_path):
    from transformers import AutoConfig

    from segprop_ray.core.iteration import build_segment
    from segprop_ray.core.parts import ModelParts, SegmentSpec
    from segprop_ray.core.weights import SafetensorsSource
    from helpers import tiny_model_dir

    model_dir = tiny_model_dir(tmp_path, num_layers=3)
    parts = ModelParts(AutoConfig.from_pretrained(model_dir))
    source = SafetensorsSource.from_model_dir(model_dir)
    segment = build_segment(parts, SegmentSpec([(i, source) for i in range(3)], source, source), trainable=False)
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    items = fact_items(4)[:6]

    reference = score_items(logits_fn_of(hf_model), TOKENIZER, items)["logprob_sums"]
    for candidate in (segment, segment.logits):
        sums = score_items(logits_fn_of(candidate), TOKENIZER, items)["logprob_sums"]
        assert all(got == pytest.approx(want, abs=1e-4) for got, want in zip(sums, reference))
    headless = build_segment(parts, SegmentSpec([(0, source)], source, None), trainable=False)
    with pytest.raises(ValueError, match="needs a segment with embedder and LM head"):
        logits_fn_of(headless)


def test_chat_style_scores_each_option_as_the_assistants_reply():
    """``chat``: the question as a user turn through the chat template (after the system message and the shots as
    earlier turns), the option's own tokens as the reply: exactly what a chat fine-tune trains on."""
    from segprop_ray.reporting.mc_eval import _sequences

    item = MCItem("what does the cow say ?", ["the cow says moo .", "the cow says woof ."], 0)
    shot = MCItem("what colour is the pig ?", ["the pig is pink .", "the pig is green ."], 0)
    sequences = _sequences(TOKENIZER, [item], [shot], None, "chat", system="answer about the farm .")
    messages = [{"role": "system", "content": "answer about the farm ."},
                {"role": "user", "content": shot.question}, {"role": "assistant", "content": shot.choices[0]},
                {"role": "user", "content": item.question}]
    prompt = TOKENIZER.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    for seq, option in zip(sequences, item.choices):
        assert seq.ids[: seq.start] == prompt
        assert seq.ids[seq.start:] == TOKENIZER(option, add_special_tokens=False)["input_ids"]
