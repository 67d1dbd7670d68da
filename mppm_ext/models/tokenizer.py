"""A byte-level tokenizer that needs no file: every UTF-8 byte is one token (ids 0..255) and id 256 is
``<|endoftext|>``. Random-weight models built from a config use it, so that a scan of text runs with no
download; it keeps the repetition structure of the text, which is all a random model can react to."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """The HF fast tokenizer described above (``len(tok) == 257``; eos = pad = bos = 256)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Order the 256 printable stand-ins by the byte they stand for, so that token id == byte value.
    chars = sorted(alphabet, key=lambda c: _BYTE_OF[c])
    vocab = {c: i for i, c in enumerate(chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=None, model_max_length=1 << 30)


def _byte_map() -> dict[str, int]:
    # GPT-2's reversible byte -> printable-character table (the one tokenizers' ByteLevel uses).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_OF = _byte_map()
