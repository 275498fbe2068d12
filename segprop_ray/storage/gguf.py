"""GGUF models as input: a ``.gguf`` file turned into a plain Hugging Face model directory (safetensors).

transformers reads GGUF files (``from_pretrained(directory, gguf_file=name)``, with the ``gguf`` package) and
dequantizes them; it refuses to save such a model, so the conversion writes the loaded model's state dict
itself, next to the config and the tokenizer taken from the same file. The result is what every job of a run
reads: fp32 weights (the training precision of the master weights), the head left out when tied (as HF saves
tied models), no quantization settings in ``config.json``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from segprop_ray.core.weights import save_tensors
from segprop_ray.storage.errors import StorageError, one_line

EXTRA = "pip install 'segprop_ray[gguf]' (the gguf and accelerate packages)"


def is_gguf(uri: str) -> bool:
    """Whether the ``model`` setting names a GGUF file."""
    return uri.lower().split("?", 1)[0].endswith(".gguf")


def check_gguf_support(uri: str) -> None:
    """One-line error when the packages transformers needs to read ``uri`` are missing."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise StorageError(f"model {uri} is a GGUF file, which needs {', '.join(missing)}: {EXTRA}")


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
