"""Tokenize + pack as a Ray Data job: read records (JSONL, Parquet, plain text; local or any fsspec URI),
encode them in the data format (:mod:`segprop_ray.core.formats`) with the model's own Hugging Face tokenizer
on an actor pool, pack into fixed-length blocks and write the token shards of both splits
(:mod:`segprop_ray.pipeline.token_packing`).

Records are tokenized in parallel but consumed in input order (``preserve_order``), so the same input
always gives the same blocks. Plain text files count one non-empty line as one document. A bad record
stops the job with one line naming its file and line. A job killed part-way continues at the last input
file whose position it saved.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator

import numpy as np
import ray

from segprop_ray.config.data import DataConfig
from segprop_ray.core.formats import ExampleEncoder, RecordError
from segprop_ray.core.packing import Example
from segprop_ray.pipeline.context import JobContext
from segprop_ray.pipeline.token_packing import InputFileCallback, Tokenization
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.fs import redact_uri, resolve_pyarrow_filesystem, split_protocol
from segprop_ray.storage.inputs import expand_inputs, input_format, input_sizes, read_chat_template
from segprop_ray.storage.models import TOKENIZER_FILE_PATTERNS, resolve_model_dir
from segprop_ray.storage.shard_format import ShardSpec
from segprop_ray.storage.tokenize_state import SplitProgress, TokenizeState, load_state

log = logging.getLogger(__name__)


class TokenizeActor:
    """Loads the tokenizer once; turns a batch of records into examples (token ids and kinds), one output row per
    input row: an empty example for a skipped record, the problem's text for a bad one (the consumer, which knows
    each row's line, raises it)."""

    def __init__(self, model: str, storage_options: dict[str, Any], data: dict[str, Any], file_format: str):
        cfg = DataConfig.model_validate(data)
        self.encoder = example_encoder(model, cfg, storage_options)
        self.parse_json = file_format == "jsonl"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths = batch["path"]
        examples = [self._example(row) for row in _rows(batch)]
        return {"ids": _objects([np.asarray(e[0], dtype=np.int64) for e in examples]),
                "kinds": _objects([np.asarray(e[1], dtype=np.uint8) for e in examples]),
                "error": np.asarray([e[2] for e in examples], dtype=object), "path": paths}

    def _example(self, row: dict[str, Any]) -> tuple[list[int], list[int], str]:
        record = row
        if self.parse_json:
            line = row["text"]
            if not str(line).strip():
                return [], [], ""
            try:
                record = json.loads(line)
            except ValueError as error:
                return [], [], f"not a JSON record ({error})"
        try:
            example = self.encoder.encode(record)
        except RecordError as error:
            return [], [], str(error)
        return ([], [], "") if example is None else (example.ids, example.kinds, "")


def _rows(batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    names = [name for name in batch if name != "path"]
    for values in zip(*(batch[name] for name in names)):
        yield {name: _plain(value) for name, value in zip(names, values)}


def _plain(value: Any) -> Any:
    """A record value as JSON would give it (Ray hands nested Parquet values as numpy arrays of dicts)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value.item() if isinstance(value, np.generic) else value


def _objects(values: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def reader_paths(files: list[str]) -> list[str]:
    """The paths Ray Data reads ``files`` (URIs) by, inside their pyarrow filesystem (as its ``path`` column names them)."""
    return [split_protocol(f)[1] if split_protocol(f)[0] == "file" else f.split("://", 1)[1] for f in files]


def read_records(files: list[str], fmt: str, fields: tuple[str, ...], storage_options: dict[str, Any]
                 ) -> ray.data.Dataset:
    """A Ray Dataset of ``files`` with a ``path`` column naming each row's file: JSONL and plain text one row per
    line (blank lines kept, so a row's index in its file is its line), Parquet one row per record with ``fields``."""
    fs, _ = resolve_pyarrow_filesystem(files[0], storage_options)
    paths = reader_paths(files)
    if fmt == "parquet":
        return ray.data.read_parquet(paths, filesystem=fs, columns=list(fields), include_paths=True)
    dataset = ray.data.read_text(paths, filesystem=fs, include_paths=True, drop_empty_lines=False)
    return dataset if fmt == "jsonl" else dataset.rename_columns({"text": fields[0]})


def file_documents(ctx: JobContext, files: list[str], start: int) -> Iterator[tuple[int, Example]]:
    """The examples of the records of ``files[start:]``, tokenized on a Ray Data actor pool, in input order, each
    with the index in ``files`` of the file it came from; a bad record stops the job with one line naming its file
    and line (JSONL, text) or row (Parquet)."""
    cfg = ctx.cfg
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # same input, same blocks
    fmt = input_format(files, cfg.data.file_format)
    dataset = read_records(files[start:], fmt, cfg.data.format_spec().fields, cfg.storage_options).map_batches(
        TokenizeActor,
        fn_constructor_kwargs={"model": ctx.model_uri, "storage_options": cfg.storage_options,
                               "data": cfg.data.model_dump(mode="json"), "file_format": fmt},
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=cfg.resources.tokenize_actors),
        num_cpus=cfg.resources.tokenize_cpus,
    )
    index_of = {path: index for index, path in enumerate(reader_paths(files))}
    place = _Place(files, start, "row" if fmt == "parquet" else "line")
    for batch in dataset.iter_batches(batch_size=256, batch_format="numpy"):
        for path, ids, kinds, error in zip(batch["path"], batch["ids"], batch["kinds"], batch["error"]):
            where = place.advance(index_of.get(str(path), -1), str(path))
            if error:
                raise RecordError(f"{where}: {error}")
            if len(ids):
                yield place.current, Example(ids.tolist(), kinds.tolist())


class _Place:
    """Which input file and line (or row) the rows coming in order belong to."""

    def __init__(self, files: list[str], start: int, unit: str):
        self.files, self.current, self.number, self.unit = files, start, 0, unit

    def advance(self, index: int, path: str) -> str:
        """Move to the next row (of file ``index``); returns ``file:line`` for messages."""
        if index < self.current:  # the saved position would be wrong: stop rather than write other blocks
            raise StorageError(f"tokenize: Ray Data read {path} out of input order (not one of the inputs "
                               f"from {self.files[self.current]} on, or after a later one)")
        if index != self.current:
            self.current, self.number = index, 0
        self.number += 1
        return f"{redact_uri(self.files[index])} {self.unit} {self.number}"


def example_encoder(model: str, data: DataConfig, storage_options: dict[str, Any]) -> ExampleEncoder:
    """The encoder of the run's data format with the tokenizer of ``model`` (the staged copy once staged; tokenizer
    files only are fetched, into the node cache) and the configured chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(model, storage_options, patterns=TOKENIZER_FILE_PATTERNS))
    template = read_chat_template(data.chat_template, storage_options) if data.chat_template else None
    return ExampleEncoder(tokenizer, data.format_spec(), template)


def tokenize_and_pack(ctx: JobContext, spec: ShardSpec, tokens_hash: str,
                      on_input_file: InputFileCallback | None = None) -> tuple[dict[str, SplitProgress], dict]:
    """Write the token shards of both splits, continuing a killed job's saved position if there is one.

    Returns each split's files and block count, and per input stream what the packer did to its examples
    (:class:`~segprop_ray.core.packing.PackStats` as a dict); the caller commits the files and clears the saved
    position. ``on_input_file(done, total)`` hears of each input file consumed (counts per input stream).
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
    tokenizer = example_encoder(ctx.model_uri, data, ctx.cfg.storage_options).tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokenization = Tokenization(layout, data, spec, state or TokenizeState(tokens_hash, inputs, sizes),
                                on_input_file=on_input_file, pad_id=pad_id or 0)
    splits = tokenization.run(lambda files, start: file_documents(ctx, files, start))
    return splits, {stream: stats.to_dict() for stream, stats in tokenization.state.stats.items()}
