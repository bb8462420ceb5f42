"""Build a small word-level CLIP BPE tokenizer (vocab.json + merges.txt) for a closed vocabulary, offline."""

from __future__ import annotations

import json
import os
import string
import tempfile
from collections.abc import Iterable
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _chain(word: str) -> list[tuple[str, str]]:
    # CLIP's BPE sees a word as its characters with "</w>" on the last one; merging left to right
    # rebuilds the whole word as one token.
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges, left = [], symbols[0]
    for right in symbols[1:]:
        merges.append((left, right))
        left = left + right
    return merges


def build_clip_tokenizer(words: Iterable[str], folder: str | os.PathLike, model_max_length: int = 32):
    """Write a CLIPTokenizer to `folder` whose vocabulary holds every word of `words` as one token.

    Characters are always in the vocabulary, so text outside the closed vocabulary still tokenizes
    (into pieces) instead of mapping to an unknown token.
    """
    from transformers import CLIPTokenizer

    words = sorted({w.lower() for w in words if w})
    merges: list[tuple[str, str]] = []
    seen = set()
    for word in words:
        for pair in _chain(word) if len(word) > 1 else []:
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
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
