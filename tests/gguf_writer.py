"""A tiny Llama written as a real GGUF file (the ``gguf`` package's writer, as llama.cpp's converter writes one):
a byte-level BPE tokenizer trained on the demo corpus, Q8_0-quantized matrices, the Q/K rows permuted for
llama.cpp's RoPE layout, tied embeddings (no ``output.weight``, as SmolLM2's file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from segprop_ray.demo.corpus import generate_corpus

HEADS, KV_HEADS, HIDDEN, LAYERS = 4, 2, 32, 4
NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(generate_corpus(300, seed=7), trainer)
    return tokenizer


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order (its RoPE pairs neighbours): what transformers undoes when it reads the file."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    _, _, index, *rest = name.split(".")
    module = ".".join(rest[:-1])
    return f"blk.{index}.{NAMES[module]}.weight"


def write_tiny_llama_gguf(path: str | Path, seed: int = 0) -> Path:
    """Write the GGUF file; returns its path."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = _tokenizer()
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    config = AutoConfig.for_model("llama", vocab_size=len(tokens), hidden_size=HIDDEN, intermediate_size=64,
                                  num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                  max_position_embeddings=128, tie_word_embeddings=True, rope_theta=10000.0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    writer = gguf.GGUFWriter(str(path), "llama")
    _metadata(writer, len(tokens))
    _tokenizer_metadata(writer, tokens, tokenizer)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: the embedding's
        _add_tensor(writer, gguf, name, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _metadata(writer, vocab_size: int) -> None:
    writer.add_name("tiny llama")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(64)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(vocab_size)


def _tokenizer_metadata(writer, tokens: list[str], tokenizer) -> None:
    import json

    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token == "<|endoftext|>" else 1 for token in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    endoftext = tokens.index("<|endoftext|>")
    writer.add_bos_token_id(endoftext)
    writer.add_eos_token_id(endoftext)
    writer.add_pad_token_id(endoftext)


def _add_tensor(writer, gguf, name: str, array: np.ndarray) -> None:
    if name.endswith("q_proj.weight"):
        array = _permute(array, HEADS)
    elif name.endswith("k_proj.weight"):
        array = _permute(array, KV_HEADS)
    if array.ndim == 2:
        quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(_gguf_name(name), quantized, raw_shape=quantized.shape,
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(_gguf_name(name), array.astype(np.float32))
