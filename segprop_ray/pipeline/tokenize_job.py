"""Tokenize + pack as a Ray Data job: read text (jsonl, Parquet, plain text; local or any fsspec URI),
tokenize with the model's own Hugging Face tokenizer on an actor pool, pack into fixed-length blocks
and write the token shards of both splits (:mod:`segprop_ray.pipeline.token_packing`).

Documents are tokenized in parallel but consumed in input order (``preserve_order``), so the same
input always gives the same blocks. Plain text files count one non-empty line as one document. A job
killed part-way continues at the last input file whose position it saved.
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import numpy as np
import ray

from segprop_ray.pipeline.context import JobContext
from segprop_ray.pipeline.token_packing import InputFileCallback, Tokenization
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.fs import resolve_pyarrow_filesystem, split_protocol
from segprop_ray.storage.inputs import expand_inputs, input_format, input_sizes
from segprop_ray.storage.models import TOKENIZER_FILE_PATTERNS, resolve_model_dir
from segprop_ray.storage.shard_format import ShardSpec
from segprop_ray.storage.tokenize_state import SplitProgress, TokenizeState, load_state

log = logging.getLogger(__name__)


class TokenizeActor:
    """Loads the tokenizer once; turns a batch of texts into token lists ending in EOS (with each one's file)."""

    def __init__(self, model: str, storage_options: dict[str, Any], text_field: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(model, storage_options,
                                                                          patterns=TOKENIZER_FILE_PATTERNS))
        self.text_field = text_field
        self.eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kept = [(str(t), path) for t, path in zip(batch[self.text_field], batch["path"])
                if t is not None and str(t).strip()]
        encoded = self.tokenizer([text for text, _ in kept])["input_ids"] if kept else []
        ids = np.empty(len(encoded), dtype=object)
        ids[:] = [np.asarray(tokens + self.eos, dtype=np.int64) for tokens in encoded]
        return {"ids": ids, "path": np.asarray([path for _, path in kept], dtype=object)}


def reader_paths(files: list[str]) -> list[str]:
    """The paths Ray Data reads ``files`` (URIs) by, inside their pyarrow filesystem (as its ``path`` column names them)."""
    return [split_protocol(f)[1] if split_protocol(f)[0] == "file" else f.split("://", 1)[1] for f in files]


def read_texts(files: list[str], fmt: str, text_field: str, storage_options: dict[str, Any]) -> ray.data.Dataset:
    """A Ray Dataset with a ``text_field`` column read from ``files`` and a ``path`` column naming each row's file."""
    fs, _ = resolve_pyarrow_filesystem(files[0], storage_options)
    paths = reader_paths(files)
    if fmt == "jsonl":  # pyarrow reads newline-delimited JSON
        return ray.data.read_json(paths, filesystem=fs, include_paths=True)
    if fmt == "parquet":
        return ray.data.read_parquet(paths, filesystem=fs, columns=[text_field], include_paths=True)
    return ray.data.read_text(paths, filesystem=fs, include_paths=True).rename_columns({"text": text_field})


def file_documents(ctx: JobContext, files: list[str], start: int) -> Iterator[tuple[int, list[int]]]:
    """Token lists of the documents of ``files[start:]``, tokenized on a Ray Data actor pool, in input order,
    each with the index in ``files`` of the file it came from."""
    cfg = ctx.cfg
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # same input, same blocks
    dataset = read_texts(files[start:], input_format(files, cfg.data.format), cfg.data.text_field, cfg.storage_options)
    dataset = dataset.map_batches(
        TokenizeActor,
        fn_constructor_kwargs={"model": cfg.model, "storage_options": cfg.storage_options,
                               "text_field": cfg.data.text_field},
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=cfg.resources.tokenize_actors),
        num_cpus=cfg.resources.tokenize_cpus,
    )
    index_of = {path: index for index, path in enumerate(reader_paths(files))}
    current = start
    for batch in dataset.iter_batches(batch_size=256, batch_format="numpy"):
        for path, ids in zip(batch["path"], batch["ids"]):
            index = index_of.get(str(path), -1)
            if index < current:  # the saved position would be wrong: stop rather than write other blocks
                raise StorageError(f"tokenize: Ray Data read {path} out of input order (not one of the inputs "
                                   f"from {files[start]} on, or after a later one)")
            current = index
            yield index, ids.tolist()


def tokenize_and_pack(ctx: JobContext, spec: ShardSpec, tokens_hash: str,
                      on_input_file: InputFileCallback | None = None) -> dict[str, SplitProgress]:
    """Write the token shards of both splits, continuing a killed job's saved position if there is one.

    Returns each split's files and block count; the caller commits them and clears the saved position.
    ``on_input_file(done, total)`` hears of each input file consumed (counts per input stream).
    """
    data, layout = ctx.cfg.data, ctx.layout
    inputs = {"train": expand_inputs(data.train, ctx.cfg.storage_options)}
    if data.eval is not None:
        inputs["eval"] = expand_inputs(data.eval, ctx.cfg.storage_options)
    sizes = {stream: input_sizes(files, ctx.cfg.storage_options) for stream, files in inputs.items()}
    state = load_state(layout, tokens_hash, inputs, sizes)
    if state is not None:
        log.warning("tokenize: continuing at %s input file %d/%d (%s)", state.stream, state.next_file + 1,
                    len(inputs[state.stream]), ", ".join(f"{s} {p.count} blocks" for s, p in state.splits.items()))
    tokenization = Tokenization(layout, data, spec, state or TokenizeState(tokens_hash, inputs, sizes),
                                on_input_file=on_input_file)
    return tokenization.run(lambda files, start: file_documents(ctx, files, start))
