"""Tiny Hugging Face models and a real tokenizer, made from configs (no download possible or needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from segprop_ray.demo.corpus import vocabulary

SPECIAL_TOKENS = ["<unk>", "<pad>", "<eos>"]
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|> {{ message['content'] }} <|end|>\n"
    "{% endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|> {% endif -%}"
)
"""A ChatML-like template: each turn ``<|role|> content <|end|>``, the generation prompt ``<|assistant|>``."""


def build_tokenizer(words: list[str] | None = None):
    """A word-level ``PreTrainedTokenizerFast`` over the demo vocabulary (EOS ``<eos>``, PAD ``<pad>``), with chat
    turn tokens after the words and :data:`CHAT_TEMPLATE` as its chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = words or vocabulary()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words + CHAT_TOKENS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_TOKENS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(intermediate_size=128, num_key_value_heads=2),
    "mistral": dict(intermediate_size=128, num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(intermediate_size=128, num_key_value_heads=2),
    "gpt2": dict(),
}


def tiny_config(family: str, vocab_size: int, num_layers: int = 8, hidden: int = 64, heads: int = 4,
                max_positions: int = 512, **overrides: Any):
    """A small config of ``family`` (llama, mistral, qwen2 or gpt2), dropout off so runs are exact."""
    from transformers import AutoConfig

    if family == "gpt2":
        kwargs = dict(n_embd=hidden, n_layer=num_layers, n_head=heads, n_positions=max_positions,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        kwargs = dict(hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=heads,
                      max_position_embeddings=max_positions, tie_word_embeddings=False, pad_token_id=1,
                      **FAMILY_CONFIGS[family])
    kwargs.update(vocab_size=vocab_size, bos_token_id=2, eos_token_id=2, **overrides)
    return AutoConfig.for_model(family, **kwargs)


def make_tiny_model(out_dir: str | Path, family: str = "llama", num_layers: int = 8, hidden: int = 64,
                    seed: int = 0, **config_overrides: Any) -> Path:
    """Write a randomly initialised tiny ``family`` model and the demo tokenizer to ``out_dir``."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = tiny_config(family, len(tokenizer), num_layers, hidden, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
