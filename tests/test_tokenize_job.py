"""Tokenize + pack as a Ray Data job, from every input format, in input order, with the model's tokenizer."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import tiny_model_dir
from pipeline_setup import pipeline_config
from segprop_ray.config import validate_config
from segprop_ray.core.packing import Example, StreamPacker, is_held_out
from segprop_ray.demo.corpus import generate_corpus, write_jsonl
from segprop_ray.demo.tiny_model import build_tokenizer
from segprop_ray.pipeline.context import JobContext
from segprop_ray.storage.fs import resolve_filesystem

TEXTS = generate_corpus(60, seed=3)


def expected_tokens() -> list[list[int]]:
    tokenizer = build_tokenizer()
    return [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in TEXTS]


def write_inputs(directory, fmt: str) -> str:
    if fmt == "jsonl":
        return str(write_jsonl(TEXTS, directory / "docs.jsonl"))
    if fmt == "parquet":
        pq.write_table(pa.table({"text": TEXTS, "other": list(range(len(TEXTS)))}), directory / "docs.parquet")
        return str(directory / "docs.parquet")
    (directory / "docs.txt").write_text("\n".join(TEXTS) + "\n\n")  # one document per non-empty line
    return str(directory / "docs.txt")


@pytest.mark.slow
@pytest.mark.parametrize("fmt,storage", [("jsonl", "file"), ("parquet", "file"), ("text", "file"),
                                         ("parquet", "s3"), ("text", "s3")])  # jsonl on s3: test_pipeline
def test_documents_are_tokenized_in_order_from_every_format(local_ray, tmp_path, request, fmt, storage):
    from segprop_ray.pipeline.tokenize_job import file_documents
    from segprop_ray.storage.inputs import expand_inputs

    path = write_inputs(tmp_path, fmt)
    if storage == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        fs, _ = resolve_filesystem(f"s3://{bucket}")
        fs.put_file(path, f"{bucket}/data/{path.rsplit('/', 1)[-1]}")
        path = f"s3://{bucket}/data/{path.rsplit('/', 1)[-1]}"
    model = tiny_model_dir(tmp_path, "llama", 4)
    cfg = validate_config(pipeline_config(str(tmp_path / "run"), str(model), path, path))
    ctx = JobContext(cfg.model_dump(mode="json"), -1, 4, {})
    assert [example.ids for _, example in file_documents(ctx, expand_inputs(path), 0)] == expected_tokens()


def test_packing_cuts_the_concatenated_stream():
    packer = StreamPacker(seq_len=4, pad_id=0)
    docs = [Example(ids, [2] * len(ids)) for ids in ([1, 2, 3], [4, 5], [6, 7, 8, 9, 10])]
    blocks = [b.ids for b in packer.add(docs)]
    assert blocks == [[1, 2, 3, 4], [5, 6, 7, 8]]  # the tail [9, 10] waits for more (dropped at the end)
    assert [c.ids for c in packer.carry] == [[9, 10]] and list(packer.finish()) == []


def test_held_out_blocks_are_spread_and_stable():
    chosen = [i for i in range(1000) if is_held_out(i, 0.1)]
    assert 95 <= len(chosen) <= 105
    assert max(b - a for a, b in zip(chosen, chosen[1:])) <= 20  # evenly spread, no long gaps
    assert chosen[:10] == [i for i in range(200) if is_held_out(i, 0.1)][:10]  # independent of stream length


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["file", "s3"])
def test_documents_carry_the_index_of_their_input_file(local_ray, tmp_path, request, storage):
    from segprop_ray.pipeline.tokenize_job import file_documents

    paths = [str(write_jsonl(TEXTS[i::3], tmp_path / f"docs-{i}.jsonl")) for i in range(3)]
    if storage == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        fs, _ = resolve_filesystem(f"s3://{bucket}")
        for i, path in enumerate(paths):
            fs.put_file(path, f"{bucket}/data/docs-{i}.jsonl")
        paths = [f"s3://{bucket}/data/docs-{i}.jsonl" for i in range(3)]
    model = tiny_model_dir(tmp_path, "llama", 4)
    cfg = validate_config(pipeline_config(str(tmp_path / "run"), str(model), paths, paths))
    ctx = JobContext(cfg.model_dump(mode="json"), -1, 4, {})
    tokens = expected_tokens()
    expected = [(i, tokens[j]) for i in (1, 2) for j in range(i, len(TEXTS), 3)]
    got = [(index, example.ids) for index, example in file_documents(ctx, paths, 1)]
    assert got == expected  # files[1:] only, each document with its file's index
