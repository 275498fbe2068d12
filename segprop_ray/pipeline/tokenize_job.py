"""Tokenize + pack as a Ray Data job: read text (jsonl, Parquet, plain text; local or any fsspec URI),
tokenize with the model's own Hugging Face tokenizer on an actor pool, pack into fixed-length blocks
and write the token shards of both splits.

Documents are tokenized in parallel but consumed in input order (``preserve_order``), so the same
input always gives the same blocks. Plain text files count one non-empty line as one document.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import ray
import torch

from segprop_ray.core.packing import BlockPacker, is_held_out
from segprop_ray.pipeline.context import JobContext
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.fs import resolve_pyarrow_filesystem, split_protocol
from segprop_ray.storage.inputs import expand_inputs, input_format
from segprop_ray.storage.models import resolve_model_dir
from segprop_ray.storage.shard_format import ShardSpec
from segprop_ray.storage.shards import FileInfo, write_token_file

class TokenizeActor:
    """Loads the tokenizer once; turns a batch of texts into token lists ending in EOS."""

    def __init__(self, model: str, storage_options: dict[str, Any], text_field: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(model, storage_options))
        self.text_field = text_field
        self.eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch[self.text_field] if t is not None and str(t).strip()]
        encoded = self.tokenizer(texts)["input_ids"] if texts else []
        ids = np.empty(len(encoded), dtype=object)
        ids[:] = [np.asarray(tokens + self.eos, dtype=np.int64) for tokens in encoded]
        return {"ids": ids}


def read_texts(files: list[str], fmt: str, text_field: str, storage_options: dict[str, Any]) -> ray.data.Dataset:
    """A Ray Dataset with a ``text_field`` column read from ``files``."""
    fs, _ = resolve_pyarrow_filesystem(files[0], storage_options)
    paths = [split_protocol(f)[1] if split_protocol(f)[0] == "file" else f.split("://", 1)[1] for f in files]
    if fmt == "jsonl":
        return ray.data.read_json(paths, filesystem=fs)  # pyarrow reads newline-delimited JSON
    if fmt == "parquet":
        return ray.data.read_parquet(paths, filesystem=fs, columns=[text_field])
    return ray.data.read_text(paths, filesystem=fs).rename_columns({"text": text_field})


def document_tokens(ctx: JobContext, spec: str | list[str]) -> Iterator[list[int]]:
    """Token lists of the documents of ``spec``, tokenized on a Ray Data actor pool, in input order."""
    cfg = ctx.cfg
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # same input, same blocks
    files = expand_inputs(spec, cfg.storage_options)
    dataset = read_texts(files, input_format(files, cfg.data.format), cfg.data.text_field, cfg.storage_options)
    dataset = dataset.map_batches(
        TokenizeActor,
        fn_constructor_kwargs={"model": cfg.model, "storage_options": cfg.storage_options,
                               "text_field": cfg.data.text_field},
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=cfg.resources.tokenize_cpus,
    )
    for batch in dataset.iter_batches(batch_size=256, batch_format="numpy"):
        for ids in batch["ids"]:
            yield ids.tolist()


class TokenShardSink:
    """Collects one split's blocks and writes a token shard file every ``rows_per_file`` blocks."""

    def __init__(self, ctx: JobContext, split: str, spec: ShardSpec, limit: int | None):
        self.ctx, self.split, self.spec, self.limit = ctx, split, spec, limit
        self.pending: list[torch.Tensor] = []
        self.files: list[FileInfo] = []
        self.count = 0

    @property
    def full(self) -> bool:
        """Whether the split has all the blocks it may take."""
        return self.limit is not None and self.count >= self.limit

    def add(self, block: torch.Tensor) -> None:
        """Take one block (T,) unless full; flush a file when one is complete."""
        if self.full:
            return
        self.pending.append(block)
        self.count += 1
        if len(self.pending) == self.spec.rows_per_file:
            self.flush()

    def flush(self) -> None:
        """Write the pending blocks as the next file."""
        if self.pending:
            ids = torch.stack(self.pending)  # (n, T)
            self.files.append(write_token_file(self.ctx.layout, self.split, len(self.files), ids, self.spec))
            self.pending = []


def tokenize_and_pack(ctx: JobContext, spec: ShardSpec) -> dict[str, TokenShardSink]:
    """Write the token shards of both splits; returns each split's sink (files written, block count)."""
    data = ctx.cfg.data
    sinks = {split: TokenShardSink(ctx, split, spec, limit)
             for split, limit in (("train", data.max_train_blocks), ("eval", data.max_eval_blocks))}
    packer = BlockPacker(data.seq_len)
    for index, block in enumerate(packer.add(document_tokens(ctx, data.train))):
        held_out = data.eval is None and is_held_out(index, data.eval_fraction)
        sinks["eval" if held_out else "train"].add(block)
        if all(sink.full for sink in sinks.values()) or (data.eval is not None and sinks["train"].full):
            break
    if data.eval is not None:
        for block in BlockPacker(data.seq_len).add(document_tokens(ctx, data.eval)):
            sinks["eval"].add(block)
            if sinks["eval"].full:
                break
    for split, sink in sinks.items():
        sink.flush()
        if sink.count == 0:
            raise StorageError(f"no {split} block of {data.seq_len} tokens could be made from the data: "
                               "add text or lower data.seq_len")
    return sinks
