"""Bad instruction data is refused in one line naming the file and the line, before any model is loaded."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import one_line_error, run_cli
from pipeline_setup import pipeline_config, write_config
from segprop_ray.config import validate_config
from segprop_ray.demo.corpus import generate_chats, generate_instructions, write_records
from segprop_ray.demo.tiny_model import CHAT_TEMPLATE, build_tokenizer, make_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model") / "llama", "llama", num_layers=4, hidden=32)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading the model (its config, for the run plan) fails the test: data problems must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr("segprop_ray.pipeline.prepare.inspect_model", refuse)


def lines_with(records: list, bad: dict, at: int) -> list:
    return records[: at - 1] + [bad] + records[at - 1:]


def refused(capsys, tmp_path, model, data_file, **data) -> str:
    raw = pipeline_config(str(tmp_path / "run"), str(model), str(data_file), str(data_file), data=data)
    capsys.readouterr()  # what building the test's model printed
    code, _, err = run_cli(capsys, "run", str(write_config(tmp_path / "c.yaml", raw)))
    assert code == 2 and not (tmp_path / "run" / "manifest.json").exists()
    return one_line_error(err)


@pytest.mark.parametrize("fmt,bad,problem", [
    ("prompt_completion", {"prompt": "what does the cow say ?"}, "no 'completion' field (it has: prompt); "
                                                                 "set data.completion_field"),
    ("prompt_completion", {"prompt": "what does the cow say ?", "completion": ""}, "empty 'completion'"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "hello"}]},
     "message 1 has unknown role 'robot'"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "no assistant message with content"),
])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, capsys, model, no_model_loading, fmt, bad, problem):
    good = generate_instructions(6) if fmt == "prompt_completion" else generate_chats(6)
    data = write_records(lines_with(good, bad, at=4), tmp_path / "train.jsonl")
    assert refused(capsys, tmp_path, model, data, format=fmt).startswith(f"segprop: error: {data} line 4: {problem}")


def test_a_parquet_record_is_named_by_row(tmp_path, capsys, model, no_model_loading):
    records = lines_with(generate_instructions(5), {"prompt": "x", "completion": " "}, at=3)
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(records), path)
    assert refused(capsys, tmp_path, model, path, format="prompt_completion") == \
        f"segprop: error: {path} row 3: empty 'completion': nothing to train on"


def test_chat_without_any_template_is_refused(tmp_path, capsys, no_model_loading):
    model = make_tiny_model(tmp_path / "model", "llama", num_layers=4, hidden=32)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    for name in ("chat_template.jinja", "chat_template.json"):
        (model / name).unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    data = write_records(generate_chats(3), tmp_path / "train.jsonl")
    message = refused(capsys, tmp_path, model, data, format="chat")
    assert message == (f"segprop: error: model {model}: data.format chat needs a chat template: the tokenizer has "
                       "none; set data.chat_template to a Jinja template file")


def test_a_template_that_renders_no_assistant_tokens_is_refused(tmp_path, capsys, model, no_model_loading):
    template = tmp_path / "users-only.jinja"
    template.write_text("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }} {% endif %}{% endfor %}")
    data = write_records(generate_chats(3), tmp_path / "train.jsonl")
    message = refused(capsys, tmp_path, model, data, format="chat", chat_template=str(template))
    assert message == f"segprop: error: {data} line 1: the chat template renders no assistant tokens"


def test_the_old_file_format_setting_is_pointed_to_its_new_name(tmp_path, capsys, model):
    data = write_records(generate_instructions(3), tmp_path / "train.jsonl")
    assert "set data.file_format: jsonl" in refused(capsys, tmp_path, model, data, format="jsonl")


def test_prompt_completion_without_an_eos_token_is_refused_up_front(tmp_path, capsys, no_model_loading):
    """The completion ends with EOS: a tokenizer without one is refused before the model is staged."""
    model = make_tiny_model(tmp_path / "model", "llama", num_layers=4, hidden=32)
    tokenizer = build_tokenizer()
    tokenizer.eos_token = None
    tokenizer.save_pretrained(model)
    data = write_records(generate_instructions(3), tmp_path / "train.jsonl")
    message = refused(capsys, tmp_path, model, data, format="prompt_completion")
    assert message == (f"segprop: error: model {model}: data.format prompt_completion needs an end-of-sequence token; "
                       "the tokenizer has none")


def test_chat_with_a_slow_tokenizer_is_refused_up_front(tmp_path, capsys, no_model_loading):
    """A slow (Python) tokenizer cannot say which characters a token came from: refused before any model is loaded,
    not a raw error inside the tokenize job."""
    from transformers import ByT5Tokenizer

    model = make_tiny_model(tmp_path / "model", "llama", num_layers=4, hidden=32)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / name).unlink(missing_ok=True)
    slow = ByT5Tokenizer()
    slow.chat_template = CHAT_TEMPLATE
    slow.save_pretrained(model)
    data = write_records(generate_chats(3), tmp_path / "train.jsonl")
    message = refused(capsys, tmp_path, model, data, format="chat")
    assert message == (f"segprop: error: model {model}: data.format chat needs a fast tokenizer (its token offsets "
                       "find the assistant turns); ByT5Tokenizer is a slow one: give the model a tokenizer.json")


def test_an_edited_chat_template_is_other_tokens_and_another_run(tmp_path, model):
    """The template file's contents, not only its path, decide the tokens: an edit is refused as another run (its
    committed work was made from the old tokens) and --restart tokenizes again."""
    from segprop_ray.pipeline.driver import Driver
    from segprop_ray.pipeline.prepare import RunConflict, tokens_digest

    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    data = write_records(generate_chats(6), tmp_path / "train.jsonl")
    cfg = validate_config(pipeline_config(str(tmp_path / "run"), str(model), str(data), str(data),
                                          data={"format": "chat", "chat_template": str(template)}))

    def prepare(restart: bool = False):
        setup = Driver(cfg, restart=restart).prepare()
        setup.lease.release()
        return setup

    first = prepare()
    assert prepare().tokens_hash == first.tokens_hash  # same contents: the same run and tokens
    template.write_text(CHAT_TEMPLATE.replace("<|end|>\n", "<|end|>\n\n"))  # same path, other contents
    with pytest.raises(RunConflict, match=r"config differs in: data\.chat_template_sha256\); pass --restart"):
        prepare()
    second = prepare(restart=True)
    assert second.tokens_hash != first.tokens_hash and second.tokens_hash == tokens_digest(cfg, second.spec)
    template.write_text(CHAT_TEMPLATE)
    assert tokens_digest(cfg, first.spec) == first.tokens_hash
