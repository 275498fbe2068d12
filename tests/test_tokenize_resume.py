"""A tokenize job killed between input files continues there and writes exactly the files of an uninterrupted job."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from segprop_ray.config.schema import DataConfig
from segprop_ray.core.blocks import CONTEXT, TARGET
from segprop_ray.core.packing import Example
from segprop_ray.pipeline.token_packing import FAIL_ENV, Tokenization
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.shard_format import ShardSpec
from segprop_ray.storage.tokenize_state import TokenizeState, clear_state, load_state

SEQ_LEN = 8
SPEC = ShardSpec(seq_len=SEQ_LEN, group_size=2, groups_per_file=2)  # 4 blocks a file
HASH = "tokens-hash"


def corpus(names: list[str], seed: int) -> dict[str, list[list[int]]]:
    """Documents of 1-20 tokens (EOS = 0 last), 12 per input file."""
    rng = random.Random(seed)
    return {name: [[rng.randrange(1, 500) for _ in range(rng.randrange(1, 20))] + [0] for _ in range(12)]
            for name in names}


class Source:
    """A stand-in for the Ray Data reader: the examples of ``files[start:]`` with their file index; records calls.
    Text documents are all targets; examples (``prompted``) have their first half as prompt."""

    def __init__(self, docs: dict[str, list[list[int]]], prompted: bool = False):
        self.docs, self.calls, self.read, self.prompted = docs, [], 0, prompted

    def __call__(self, files: list[str], start: int):
        self.calls.append((files[0], start))
        for index in range(start, len(files)):
            for tokens in self.docs[files[index]]:
                self.read += 1
                context = len(tokens) // 2 + 1 if self.prompted else 0
                yield index, Example(tokens, [CONTEXT] * context + [TARGET] * (len(tokens) - context))


TRAIN = [f"train-{i}.jsonl" for i in range(6)]
EVAL = [f"eval-{i}.jsonl" for i in range(3)]
DOCS = {**corpus(TRAIN, 1), **corpus(EVAL, 2)}


def tokenize(root: Path, data: DataConfig, source: Source, stats: dict | None = None):
    """Run (or continue) the tokenization of ``root``; ``stats`` receives the packers' counts per stream."""
    layout = RunLayout.open(str(root))
    inputs = {"train": TRAIN, **({"eval": EVAL} if data.eval is not None else {})}
    state = load_state(layout, HASH, inputs) or TokenizeState(HASH, inputs)
    result = Tokenization(layout, data, SPEC, state, save_every_s=0, pad_id=1).run(source)
    if stats is not None:
        stats.update({stream: counts.to_dict() for stream, counts in state.stats.items()})
    return result


def token_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "tokens").glob("*/part-*.parquet"))}


LAYOUTS = [("text", True), ("prompt_completion", True), ("prompt_completion", False)]
"""(data.format, data.packing): the stream packer, whole examples packed, one example per block."""


@pytest.mark.parametrize("fmt,packing", LAYOUTS)
@pytest.mark.parametrize("eval_data,fail_at", [(None, "train:3"), ("eval", "train:4"), ("eval", "eval:2")])
def test_killed_tokenize_job_continues_at_its_input_file_and_writes_the_same_bytes(tmp_path, monkeypatch,
                                                                                   eval_data, fail_at, fmt, packing):
    monkeypatch.setattr("segprop_ray.core.packing.PACK_WINDOW", 5)  # windows close mid-file and across files
    data = DataConfig(train=TRAIN, eval=EVAL if eval_data else None, seq_len=SEQ_LEN, eval_fraction=0.25,
                      format=fmt, packing=packing)
    prompted, whole_stats, resumed_stats = fmt != "text", {}, {}
    whole = tokenize(tmp_path / "whole", data, Source(DOCS, prompted), whole_stats)

    monkeypatch.setenv(FAIL_ENV, fail_at)
    with pytest.raises(RuntimeError, match=FAIL_ENV):
        tokenize(tmp_path / "killed", data, Source(DOCS, prompted))
    assert token_files(tmp_path / "killed"), "files were written before the kill"
    monkeypatch.delenv(FAIL_ENV)
    source = Source(DOCS, prompted)
    resumed = tokenize(tmp_path / "killed", data, source, resumed_stats)

    stream, index = fail_at.split(":")
    assert source.calls[0] == ((TRAIN if stream == "train" else EVAL)[0], int(index))  # no earlier file read again
    assert {s: (p.count, p.files) for s, p in resumed.items()} == {s: (p.count, p.files) for s, p in whole.items()}
    assert token_files(tmp_path / "killed") == token_files(tmp_path / "whole")
    assert whole["eval"].count > 0 and len(whole["train"].files) > 2
    assert resumed_stats == whole_stats  # the truncation counts survive the restart
    assert whole_stats["train"]["truncated"] > 0 if prompted else whole_stats["train"]["examples"] == 72


def test_limits_stop_the_stream_and_survive_a_resume(tmp_path, monkeypatch):
    data = DataConfig(train=TRAIN, seq_len=SEQ_LEN, eval_fraction=0.25, max_train_blocks=21, max_eval_blocks=3)
    source = Source(DOCS)
    whole = tokenize(tmp_path / "whole", data, source)
    assert (whole["train"].count, whole["eval"].count) == (21, 3)
    assert 12 < source.read < 3 * 12  # stopped in the second or third of 6 input files
    monkeypatch.setenv(FAIL_ENV, "train:1")
    with pytest.raises(RuntimeError):
        tokenize(tmp_path / "killed", data, Source(DOCS))
    monkeypatch.delenv(FAIL_ENV)
    tokenize(tmp_path / "killed", data, Source(DOCS))
    assert token_files(tmp_path / "killed") == token_files(tmp_path / "whole")


def killed_run(root: Path, monkeypatch) -> RunLayout:
    monkeypatch.setenv(FAIL_ENV, "train:4")
    with pytest.raises(RuntimeError):
        tokenize(root, DataConfig(train=TRAIN, seq_len=SEQ_LEN), Source(DOCS))
    monkeypatch.delenv(FAIL_ENV)
    return RunLayout.open(str(root))


def test_saved_position_is_dropped_when_inputs_or_files_changed(tmp_path, monkeypatch, caplog):
    layout = killed_run(tmp_path, monkeypatch)
    assert load_state(layout, HASH, {"train": TRAIN}).next_file == 4
    caplog.set_level(logging.WARNING)
    assert load_state(layout, "other-hash", {"train": TRAIN}) is None
    assert load_state(layout, HASH, {"train": TRAIN + ["train-6.jsonl"]}) is None
    assert "input files are not the ones" in caplog.text

    written = sorted((tmp_path / "tokens" / "train").glob("part-*.parquet"))[0]
    written.write_bytes(written.read_bytes()[:-1] + b"\0")  # same size, other content
    assert load_state(layout, HASH, {"train": TRAIN}) is None
    assert f"token file train/{written.name} is missing or changed" in caplog.text


def test_clear_state_removes_the_position(tmp_path, monkeypatch):
    layout = killed_run(tmp_path, monkeypatch)
    clear_state(layout)
    assert load_state(layout, HASH, {"train": TRAIN}) is None
    assert not (tmp_path / "tokens" / "_resume").exists()


def test_input_files_consumed_are_reported_per_stream(tmp_path):
    data = DataConfig(train=TRAIN, eval=EVAL, seq_len=SEQ_LEN)
    inputs, heard = {"train": TRAIN, "eval": EVAL}, []
    Tokenization(RunLayout.open(str(tmp_path)), data, SPEC, TokenizeState(HASH, inputs), save_every_s=3600,
                 on_input_file=lambda done, total: heard.append((done, total))).run(Source(DOCS))
    total = {"train": 6, "eval": 3}
    assert heard == [({"train": i, "eval": 0}, total) for i in range(1, 6)] + [({"train": 6, "eval": i}, total)
                                                                              for i in (1, 2)]
    assert not (tmp_path / "tokens" / "_resume").exists()  # nothing saved within the hour


def test_saved_position_without_its_pending_blocks_is_dropped(tmp_path, monkeypatch, caplog):
    layout = killed_run(tmp_path, monkeypatch)
    for pending in (tmp_path / "tokens" / "_resume").glob("pending-*.parquet"):
        pending.write_bytes(b"not parquet")
    caplog.set_level(logging.WARNING)
    assert load_state(layout, HASH, {"train": TRAIN}) is None
    assert "unreadable" in caplog.text


def test_job_killed_between_its_pending_file_and_state_json_leaves_a_consistent_position(tmp_path, monkeypatch):
    """Job 1 saves once and dies; job 2 dies after writing its pending blocks but before state.json names them.
    Job 3 must continue from job 1's position with job 1's pending blocks, and write what one job writes."""
    from segprop_ray.storage import tokenize_state

    data = DataConfig(train=TRAIN, seq_len=SEQ_LEN, eval_fraction=0.25)
    tokenize(tmp_path / "whole", data, Source(DOCS))
    monkeypatch.setenv(FAIL_ENV, "train:1")
    with pytest.raises(RuntimeError):
        tokenize(tmp_path / "killed", data, Source(DOCS))
    monkeypatch.delenv(FAIL_ENV)

    class KilledBeforeTheState:  # reads state.json as usual; dies where it would write it
        read = tokenize_state.STATE_FORMAT.read

        def write(self, *args):
            raise RuntimeError("killed before state.json")

    with monkeypatch.context() as patch:
        patch.setattr(tokenize_state, "STATE_FORMAT", KilledBeforeTheState())
        with pytest.raises(RuntimeError, match="killed before state.json"):
            tokenize(tmp_path / "killed", data, Source(DOCS))
    source = Source(DOCS)
    tokenize(tmp_path / "killed", data, source)
    assert source.calls == [(TRAIN[0], 1)]
    assert token_files(tmp_path / "killed") == token_files(tmp_path / "whole")


def test_saved_position_is_dropped_when_an_input_file_was_edited(tmp_path, monkeypatch, caplog):
    data, inputs = DataConfig(train=TRAIN, seq_len=SEQ_LEN), {"train": TRAIN}
    sizes = {"train": [1000 + i for i in range(len(TRAIN))]}
    layout = RunLayout.open(str(tmp_path))
    monkeypatch.setenv(FAIL_ENV, "train:3")
    with pytest.raises(RuntimeError):
        Tokenization(layout, data, SPEC, TokenizeState(HASH, inputs, sizes), save_every_s=0).run(Source(DOCS))
    assert load_state(layout, HASH, inputs, sizes).next_file == 3
    caplog.set_level(logging.WARNING)
    edited = {"train": [7, *sizes["train"][1:]]}  # a file already read was rewritten
    assert load_state(layout, HASH, inputs, edited) is None
    assert "an input file changed size since the job started" in caplog.text
