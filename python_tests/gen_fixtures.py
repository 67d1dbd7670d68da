"""Tiny Hugging Face models and a word-level tokenizer built in memory, for the steered-generation tests
(no files, no hub). The models run in float64 so that greedy decoding never flips on rounding noise:
random weights give nearly flat logits, where float32 near-ties are common."""

from __future__ import annotations

import pytest
import torch

WORDS = ("the sea is calm and blue today while a ship sails far from home under grey sky "
         "wind rain storm ocean wave water fish boat shore sand cold warm night day light dark "
         "city street car road house tree forest green mountain river stone fire bright old new").split()


def word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def tiny_model(family: str = "llama", vocab_size: int = 64, seed: int = 0):
    """A random-weight causal LM with 2 blocks, d = 32, in float64 and eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          pad_token_id=1, eos_token_id=2, bos_token_id=2)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                         pad_token_id=1, eos_token_id=2, bos_token_id=2)
        model = GPT2LMHeadModel(cfg)
    # Larger weights than the default init: logits far from flat, so steering and greedy choices matter.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return model.double().eval()


def tiny_model_dir(path):
    """The tiny Llama and the word tokenizer saved as a local Hugging Face directory (what ``--model``
    accepts) at ``path``; returns ``path``."""
    tiny_model("llama").float().save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok():
    """The word-level tokenizer, once per test module."""
    return word_tokenizer()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    """A tiny float64 model of each family, once per test module."""
    return tiny_model(request.param)
