"""Architectures the random-weight models are built from: one config per (family, size), written in code so
that no file has to be fetched. Real sizes follow the published configs of the paper's model families; the
``tiny`` size of each family keeps its architecture (norm kind, tied or biased unembedding, rotary fraction)
at d <= 64 and a 263-token vocabulary so that tests run in milliseconds."""

from __future__ import annotations

from typing import Callable

from transformers import (GPT2Config, GPTNeoXConfig, Gemma3TextConfig, LlamaConfig, OPTConfig, PhiConfig,
                          PretrainedConfig, Qwen2Config)

# Odd on purpose (and >= 257, the byte tokenizer's vocabulary): catches code that assumes round vocabularies.
TINY_VOCAB = 263


# Random models use the byte tokenizer (.tokenizer), whose only special token, <|endoftext|>, is id 256.
_SPECIAL = {"bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 256}


def _rope(theta: float, **extra) -> dict:
    return {"rope_type": "default", "rope_theta": theta, **extra}


def _llama(d, ff, layers, heads, kv, vocab=49152, theta=100000.0, tied=True) -> PretrainedConfig:
    return LlamaConfig(**_SPECIAL, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied, rms_norm_eps=1e-5,
                       max_position_embeddings=8192, rope_parameters=_rope(theta))


def _qwen2(d, ff, layers, heads, kv, vocab=151936, tied=True) -> PretrainedConfig:
    return Qwen2Config(**_SPECIAL, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied, rms_norm_eps=1e-6,
                       max_position_embeddings=32768, rope_parameters=_rope(1000000.0))


def _gpt2(d, layers, heads, vocab=50257) -> PretrainedConfig:
    return GPT2Config(**_SPECIAL, n_embd=d, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=1024)


def _neox(d, ff, layers, heads, vocab=50304) -> PretrainedConfig:
    return GPTNeoXConfig(**_SPECIAL, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers, num_attention_heads=heads,
                         vocab_size=vocab, use_parallel_residual=True, tie_word_embeddings=False,
                         max_position_embeddings=2048, rope_parameters=_rope(10000.0, partial_rotary_factor=0.25))


def _opt(d, ff, layers, heads, vocab=50272, proj=None, pre_ln=True) -> PretrainedConfig:
    return OPTConfig(**_SPECIAL, hidden_size=d, ffn_dim=ff, num_hidden_layers=layers, num_attention_heads=heads,
                     vocab_size=vocab, word_embed_proj_dim=proj or d, do_layer_norm_before=pre_ln,
                     max_position_embeddings=2048)


def _gemma3(d, ff, layers, heads, kv, head_dim=256, vocab=262144, window=512) -> PretrainedConfig:
    return Gemma3TextConfig(**_SPECIAL, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=kv, head_dim=head_dim, query_pre_attn_scalar=head_dim,
                            vocab_size=vocab, sliding_window=window, max_position_embeddings=32768)


def _phi(d, ff, layers, heads, vocab=51200) -> PretrainedConfig:
    return PhiConfig(**_SPECIAL, hidden_size=d, intermediate_size=ff, num_hidden_layers=layers, num_attention_heads=heads,
                     vocab_size=vocab, max_position_embeddings=2048,
                     rope_parameters=_rope(10000.0, partial_rotary_factor=0.5))


# family -> size -> config builder. Sizes are the published parameter counts of the models they copy.
FAMILIES: dict[str, dict[str, Callable[[], PretrainedConfig]]] = {
    "llama": {  # SmolLM2 (Llama architecture)
        "tiny": lambda: _llama(48, 96, 2, 4, 2, vocab=TINY_VOCAB),
        "135m": lambda: _llama(576, 1536, 30, 9, 3),
        "360m": lambda: _llama(960, 2560, 32, 15, 5),
        "1.7b": lambda: _llama(2048, 8192, 24, 32, 32, theta=130000.0),
    },
    "qwen2": {  # Qwen2.5
        "tiny": lambda: _qwen2(32, 64, 2, 4, 2, vocab=TINY_VOCAB),
        "0.5b": lambda: _qwen2(896, 4864, 24, 14, 2),
        "1.5b": lambda: _qwen2(1536, 8960, 28, 12, 2),
        "3b": lambda: _qwen2(2048, 11008, 36, 16, 2),
    },
    "gpt2": {
        "tiny": lambda: _gpt2(64, 2, 4, vocab=TINY_VOCAB),
        "124m": lambda: _gpt2(768, 12, 12),
        "355m": lambda: _gpt2(1024, 24, 16),
        "774m": lambda: _gpt2(1280, 36, 20),
        "1.5b": lambda: _gpt2(1600, 48, 25),
    },
    "pythia": {  # GPT-NeoX architecture
        "tiny": lambda: _neox(32, 128, 2, 4, vocab=TINY_VOCAB),
        "160m": lambda: _neox(768, 3072, 12, 12),
        "410m": lambda: _neox(1024, 4096, 24, 16),
        "1b": lambda: _neox(2048, 8192, 16, 8),
        "1.4b": lambda: _neox(2048, 8192, 24, 16),
        "2.8b": lambda: _neox(2560, 10240, 32, 32),
    },
    "opt": {
        "tiny": lambda: _opt(32, 64, 2, 4, vocab=TINY_VOCAB),
        # OPT-350m alone is post-LN and projects 1024 -> 512 before its unembedding.
        "tiny-proj": lambda: _opt(32, 64, 2, 4, vocab=TINY_VOCAB, proj=16, pre_ln=False),
        "125m": lambda: _opt(768, 3072, 12, 12),
        "350m": lambda: _opt(1024, 4096, 24, 16, proj=512, pre_ln=False),
        "1.3b": lambda: _opt(2048, 8192, 24, 32),
        "2.7b": lambda: _opt(2560, 10240, 32, 32),
    },
    "gemma3": {
        "tiny": lambda: _gemma3(32, 64, 2, 4, 1, head_dim=16, vocab=TINY_VOCAB, window=8),
        "270m": lambda: _gemma3(640, 2048, 18, 4, 1),
        "1b": lambda: _gemma3(1152, 6912, 26, 4, 1),
    },
    "phi": {  # Phi-1.5 / Phi-2: LayerNorm, partial rotary, an unembedding with a bias
        "tiny": lambda: _phi(32, 64, 2, 4, vocab=TINY_VOCAB),
        "1.3b": lambda: _phi(2048, 8192, 24, 32),
        "2.7b": lambda: _phi(2560, 10240, 32, 32),
    },
}
# Aliases with the names people use for these architectures.
FAMILY_ALIASES = {"smollm2": "llama", "gpt-neox": "pythia", "gpt_neox": "pythia", "neox": "pythia",
                  "qwen": "qwen2", "gemma": "gemma3"}


def random_names() -> list[str]:
    """Every ``random:<family>-<size>`` name :func:`mppm_ext.models.load` accepts."""
    return [f"random:{family}-{size}" for family, sizes in FAMILIES.items() for size in sizes]


def with_tokenizer(config: PretrainedConfig, tokenizer) -> PretrainedConfig:
    """A copy of ``config`` for ``tokenizer``: vocabulary of ``len(tokenizer)`` and its special-token ids
    (the byte tokenizer's id 256 may mean another token there, or none)."""
    out = config.__class__.from_dict(config.to_dict())
    out.vocab_size = len(tokenizer)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    out.eos_token_id = eos
    out.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos
    out.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return out


def config_for(spec: str) -> tuple[str, PretrainedConfig]:
    """(family, config) for ``<family>-<size>``, e.g. ``llama-135m``; ValueError naming the choices otherwise."""
    family, sep, size = spec.partition("-")
    family = FAMILY_ALIASES.get(family.lower(), family.lower())
    if not sep or family not in FAMILIES:
        raise ValueError(f"random model {spec!r}: expected '<family>-<size>' with family one of "
                         f"{sorted(FAMILIES)} (aliases {sorted(FAMILY_ALIASES)})")
    sizes = FAMILIES[family]
    if size.lower() not in sizes:
        raise ValueError(f"random model {spec!r}: family {family!r} has sizes {list(sizes)}")
    return family, sizes[size.lower()]()
