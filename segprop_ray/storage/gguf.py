"""GGUF models as input: a ``.gguf`` file turned into a plain Hugging Face model directory (safetensors).

transformers reads GGUF files (``from_pretrained(directory, gguf_file=name)``, with the ``gguf`` package) and
dequantizes them; it refuses to save such a model, so the conversion writes the loaded model's state dict
itself, next to the config and the tokenizer taken from the same file. The result is what every job of a run
reads: fp32 weights (the training precision of the master weights), the head left out when tied (as HF saves
tied models), no quantization settings in ``config.json``.

:func:`gguf_model_dir` is what resolving the ``model`` setting gives for a ``.gguf``: a directory in the node's
cache, converted once per file, with only the config and tokenizer when no weights were asked for (planning a
run on the head reads the file's metadata, never dequantizes it). A run stages the converted copy into its run
directory once (:mod:`segprop_ray.storage.model_stage`), and every job reads that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from segprop_ray.core.weights import save_tensors
from segprop_ray.storage.errors import StorageError, one_line
from segprop_ray.storage.fs import cache_root, redact_uri, resolve_filesystem, split_protocol

EXTRA = "pip install 'segprop_ray[gguf]' (the gguf and accelerate packages)"


def is_gguf(uri: str) -> bool:
    """Whether the ``model`` setting names a GGUF file."""
    return uri.lower().split("?", 1)[0].endswith(".gguf")


def check_gguf_support(uri: str) -> None:
    """One-line error when the packages transformers needs to read ``uri`` are missing."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise StorageError(f"model {uri} is a GGUF file, which needs {', '.join(missing)}: {EXTRA}")


def gguf_model_dir(model: str, storage_options: dict[str, Any] | None = None, cache_dir: str | Path | None = None,
                   weights: bool = True) -> Path:
    """A local Hugging Face directory of the GGUF file ``model`` (local or any fsspec URI): config and tokenizer,
    and the dequantized weights when ``weights``; converted once per node and file."""
    check_gguf_support(model)
    local = _local_file(model, storage_options, cache_dir)
    stat = local.stat()
    key = hashlib.sha256(repr((str(local), stat.st_size, stat.st_mtime_ns, weights)).encode()).hexdigest()[:16]
    target = Path(cache_dir or cache_root() / "models") / f"gguf-{key}"
    if (target / ".complete").is_file():
        return target
    staging = target.parent / f".gguf-{key}.{uuid.uuid4().hex}"
    try:
        (convert_gguf if weights else _config_and_tokenizer)(local, staging)
        (staging / ".complete").write_text(model)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _local_file(model: str, storage_options: dict[str, Any] | None, cache_dir: str | Path | None) -> Path:
    protocol, path = split_protocol(model)
    if protocol == "file":
        if not Path(path).is_file():
            raise StorageError(f"model file not found: {model}")
        return Path(path)
    target = Path(cache_dir or cache_root() / "models") / hashlib.sha256(model.encode()).hexdigest()[:16] / \
        path.rsplit("/", 1)[-1]
    if not target.is_file():
        try:
            fs, remote = resolve_filesystem(model, storage_options)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(f".{uuid.uuid4().hex}.part")
            fs.get_file(remote, str(partial))
            partial.replace(target)
        except Exception as error:  # noqa: BLE001 - one line naming the model
            raise StorageError(f"model {redact_uri(model)} could not be read: {one_line(error)}") from None
    return target


def _publish(staging: Path, target: Path) -> None:
    try:
        staging.rename(target)
    except OSError:
        if not (target / ".complete").is_file():  # an unfinished target of another attempt: replace it
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)


def _config_and_tokenizer(gguf_file: Path, out: Path) -> Path:
    """Only what planning needs: ``config.json`` and the tokenizer, read from the file's metadata."""
    from transformers import AutoConfig, AutoTokenizer

    where, name = str(gguf_file.parent), gguf_file.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        raise StorageError(f"model {gguf_file}: transformers cannot load this GGUF file ({one_line(error)})") from None
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    _drop_quantization(out / "config.json")
    tokenizer.save_pretrained(out)
    return out


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the model and tokenizer of the local ``gguf_file`` as a Hugging Face directory ``out_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_file, out = Path(gguf_file), Path(out_dir)
    check_gguf_support(str(gguf_file))
    where, name = str(gguf_file.parent), gguf_file.name
    try:
        config = AutoConfig.from_pretrained(where, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=dtype)
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        raise StorageError(f"model {gguf_file}: transformers cannot load this GGUF file ({one_line(error)})") from None
    state = dict(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the embedding's tensor, as HF saves tied models
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    _drop_quantization(out / "config.json")
    save_tensors({k: v.to(dtype) for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    return out


def _drop_quantization(config_path: Path) -> None:
    data = json.loads(config_path.read_text())
    data.pop("quantization_config", None)
    data["dtype" if "dtype" in data else "torch_dtype"] = "float32"
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
