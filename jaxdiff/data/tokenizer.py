"""Build a small word-level CLIP BPE tokenizer (vocab.json + merges.txt) for a closed vocabulary, offline."""

from __future__ import annotations

import json
import os
import string
import tempfile
from collections.abc import Iterable
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    # CLIP's BPE sees a word as its characters with "</w>" on the last one and applies the best-ranked
    # merge of adjacent symbols until none applies.
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges under which every word becomes one token.

    Each word's remaining pieces are merged left to right by merges appended after all earlier ones, so
    they never fire before a merge another word relies on and words already whole stay whole (a merge
    chain per word in isolation would not: "el" from "else" would cut into "yellow").
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _bpe(word, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    return merges


def build_clip_tokenizer(words: Iterable[str], folder: str | os.PathLike, model_max_length: int = 32):
    """Write a CLIPTokenizer to `folder` whose vocabulary holds every word of `words` as one token.

    Characters are always in the vocabulary, so text outside the closed vocabulary still tokenizes
    (into pieces) instead of mapping to an unknown token.
    """
    from transformers import CLIPTokenizer

    words = sorted({w.lower() for w in words if w})
    merges = _word_merges(words)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab_tokens = [BOS, EOS] + list(chars) + [c + "</w>" for c in chars]
    vocab_tokens += ["".join(p) for p in merges]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_tokens))}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(3):  # add pieces produced when one word's merges cut into another's
            (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
            (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
            tok = CLIPTokenizer(
                str(Path(tmp) / "vocab.json"),
                str(Path(tmp) / "merges.txt"),
                model_max_length=model_max_length,
                bos_token=BOS,
                eos_token=EOS,
                pad_token=EOS,
                unk_token=EOS,
            )
            pieces = {p for w in words for p in tok.tokenize(w)} - set(vocab)
            if not pieces:
                break
            for p in sorted(pieces):
                vocab[p] = len(vocab)
        tok.save_pretrained(str(folder))
    return tok
