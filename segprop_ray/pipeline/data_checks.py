"""Checking the data before any model is loaded: the records of every input file hold what the data format needs.

The first :data:`RECORDS_PER_FILE` records of each of the first :data:`FILES_PER_INPUT` files of every input
setting are read and checked (fields present, strings where strings belong, a non-empty completion, known
message roles). For ``prompt_completion`` and ``chat``, the tokenizer (its files only) is loaded and the first
records are tokenized (conversations rendered), so a tokenizer without an end-of-sequence token, a missing chat
template, a slow tokenizer for ``chat`` or a template that renders no assistant tokens is caught here.
Every problem is one line naming the file and the line (JSONL, text) or row (Parquet). The tokenize job
checks every record again as it reads it.
"""

from __future__ import annotations

from segprop_ray.config import Config
from segprop_ray.core.formats import RecordError, check_record
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.inputs import expand_inputs, input_format, sample_records

RECORDS_PER_FILE = 1000
FILES_PER_INPUT = 32
ENCODED_PER_FILE = 8
"""Records of each checked file that are also tokenized (``chat``: rendering through the template; not ``text``)."""


class DataError(StorageError):
    """A record of the input data that the data format cannot use."""


def check_data(cfg: Config, model_source: str = "") -> None:
    """One-line :class:`DataError` for the first bad record found in the configured inputs (the tokenizer read from
    ``model_source``, the run's staged copy of the model, when given; else from the config's ``model``)."""
    data = cfg.data
    spec = data.format_spec()
    encoder = _example_encoder(cfg, model_source) if data.format != "text" else None
    for setting, value in (("data.train", data.train), ("data.eval", data.eval)):
        if value is None:
            continue
        files = expand_inputs(value, cfg.storage_options, setting)
        fmt = input_format(files, data.file_format)
        if data.format != "text" and fmt == "text":
            raise DataError(f"{setting} {files[0]} is plain text: data.format {data.format} needs JSONL or Parquet "
                            "records (or set data.file_format)")
        for file in files[:FILES_PER_INPUT]:
            for number, (where, record) in enumerate(sample_records(file, fmt, spec.fields, RECORDS_PER_FILE,
                                                                    cfg.storage_options)):
                _check_one(where, record, spec, encoder if number < ENCODED_PER_FILE else None)


def _check_one(where: str, record, spec, encoder) -> None:
    try:
        check_record(spec, record)
        if encoder is not None:
            encoder.encode(record)
    except RecordError as error:
        raise DataError(f"{where}: {error}") from None


def _example_encoder(cfg: Config, model_source: str):
    """The encoder the tokenize job will use (tokenizer files only), or a one-line error naming what is missing."""
    from segprop_ray.pipeline.tokenize_job import example_encoder

    try:
        return example_encoder(model_source or cfg.model, cfg.data, cfg.storage_options)
    except RecordError as error:
        raise DataError(f"model {cfg.model}: {error}") from None
