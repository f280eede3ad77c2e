"""The LLaMA tokenizer with SmartEdit's 35 added tokens, and an offline stand-in for tests.

The real tokenizer (Vicuna/LLaMA sentencepiece, 32000 ids) ships with the LLaVA-1.1 checkpoint; `smartedit-convert`
adds the 35 tokens to it with `add_smartedit_tokens` and saves it beside the weights. Tests and random-weight presets
cannot download it, so `build_offline_tokenizer` makes one in code with the same special ids (<unk> 0, <s> 1, </s> 2),
LLaMA's byte-fallback pieces (<0x00>..<0xFF> = 3..258), 32000 base ids in all, and the same 35 added ids.
"""

from __future__ import annotations

import string

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .config import (
    BASE_VOCAB_SIZE,
    IM_END_ID,
    IM_START_ID,
    IMG_START_ID,
    IMG_TOKEN_ID,
    NUM_IMG_TOKENS,
    VOCAB_SIZE,
)
from .errors import CheckpointError

IMG_TOKEN = "<img>"
IM_START = "<im_start>"
IM_END = "<im_end>"
IMG_TOKENS = tuple(f"<img_{i}>" for i in range(NUM_IMG_TOKENS))


def add_smartedit_tokens(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add the 35 tokens in the official order (DS_SmartEdit_model.py:84-113) and check they got the official ids."""
    if len(tokenizer) == VOCAB_SIZE and tokenizer.convert_tokens_to_ids(IMG_TOKENS[-1]) == VOCAB_SIZE - 1:
        return tokenizer  # already has them
    if len(tokenizer) != BASE_VOCAB_SIZE:
        raise CheckpointError(
            f"expected a LLaMA tokenizer with {BASE_VOCAB_SIZE} ids before adding SmartEdit's tokens, got {len(tokenizer)}"
            " (LLaVA-1.1's own tokenizer has 32003: use the Vicuna-1.1 / LLaMA tokenizer)"
        )
    # The official slow LlamaTokenizer (transformers 4.28-era) stripped the whitespace on both sides of tokens
    # added as plain strings, so ' <img_0> <img_1>' became two adjacent ids: lstrip/rstrip reproduce that.
    def added(t: str, special: bool) -> AddedToken:
        return AddedToken(t, special=special, normalized=False, lstrip=True, rstrip=True)

    tokenizer.add_tokens([added(IMG_TOKEN, False)])
    tokenizer.add_tokens([added(t, True) for t in (IM_START, IM_END)], special_tokens=True)
    tokenizer.add_tokens([added(t, False) for t in IMG_TOKENS])
    expected = {IMG_TOKEN: IMG_TOKEN_ID, IM_START: IM_START_ID, IM_END: IM_END_ID, IMG_TOKENS[0]: IMG_START_ID,
                IMG_TOKENS[-1]: IMG_START_ID + NUM_IMG_TOKENS - 1}
    got = {t: tokenizer.convert_tokens_to_ids(t) for t in expected}
    if got != expected:
        raise CheckpointError(f"SmartEdit token ids differ from the official ones: got {got}, expected {expected}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # official: pad = unk
    return tokenizer


def build_offline_tokenizer(add_tokens: bool = True) -> PreTrainedTokenizerFast:
    """A LLaMA-shaped tokenizer made in code: character-level BPE with byte fallback, 32000 base ids (+ the 35)."""
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    pieces = ["▁"] + [c for c in string.printable if not c.isspace()]
    pieces += ["▁" + c for c in string.printable if not c.isspace()]
    for p in pieces:
        vocab.setdefault(p, len(vocab))
    while len(vocab) < BASE_VOCAB_SIZE:  # unreachable filler so that ids line up with the real vocabulary size
        vocab[f"<unused_{len(vocab)}>"] = len(vocab)
    # "▁a" etc. are reachable through merges ("▁", "a"), which keeps spaces attached to the next piece, as in LLaMA.
    merges = [("▁", c) for c in string.printable if not c.isspace()]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # LLaMA's non-legacy sentencepiece behaviour: spaces become "▁", one "▁" is prepended to the text's first piece
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>", padding_side="right", model_max_length=2048)
    return add_smartedit_tokens(fast) if add_tokens else fast
