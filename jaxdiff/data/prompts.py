"""Prompts-only data (captions, no images) for data-free objectives: token ids from a text file or the shapes world.

Use it as `data.source = "jaxdiff.data.prompts:prompts"` with `data.options`:
  file: a UTF-8 text file, one prompt per line (blank lines and lines starting with "#" skipped), or
  shapes: "train" | "validation" | "test" — the shapes world's captions of that split (nothing is rendered),
  caption: "caption" (train phrasings, default) or "heldout_caption" (the held-out ones), shapes only,
  num_records: how many (0 = every line of the file; required for shapes).
Records: `input_ids` [L] int32 (the tokenizer's padded length) and `prompt_index` int32. The tokenizer is
`data.tokenizer` (a tokenizer or pipeline folder, which the trainer sets to the model's when empty), else the built-in
shapes pipeline's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxdiff.errors import UserError
from jaxdiff.sampling import text

OPTIONS = ("file", "shapes", "caption", "num_records")


class Prompts:
    """A random-access source of tokenized prompts (each tokenized once, when first read)."""

    def __init__(self, prompts: list[str], tokenizer):
        if not prompts:
            raise UserError("the prompt source is empty")
        self.prompts, self.tokenizer = list(prompts), tokenizer
        self._ids: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self.prompts):
            raise IndexError(index)
        if index not in self._ids:
            self._ids[index] = text.tokenize(self.tokenizer, [self.prompts[index]])[0]
        return {"input_ids": self._ids[index], "prompt_index": np.int32(index)}


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a text file: one per line, blank lines and "#" comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data.options.file: no such file {path}")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def shapes_captions(split: str, n: int, caption: str = "caption") -> list[str]:
    """The first `n` captions of a shapes split, as its examples have them."""
    from jaxdiff.data.shapes_tfds import scene_and_captions

    if caption not in ("caption", "heldout_caption"):
        raise UserError(f"data.options.caption must be 'caption' or 'heldout_caption', got {caption!r}")
    return [scene_and_captions(split, i)[1 if caption == "caption" else 2] for i in range(n)]


def prompts(data_config) -> Prompts:
    """The prompt source a trainer data config names (see the module docstring)."""
    from jaxdiff.sampling.pipeline import BUILTIN

    options = dict(data_config.get("options", {}) or {})
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise UserError(f"data.options: unknown keys {sorted(unknown)} (known: {', '.join(OPTIONS)})")
    if bool(options.get("file")) == bool(options.get("shapes")):
        raise UserError("data.options: set exactly one of file (a text file of prompts) and shapes (a split name)")
    n = int(options.get("num_records", 0))
    if options.get("file"):
        lines = read_prompts(options["file"])
        chosen = lines[:n] if n else lines
    else:
        if n <= 0:
            raise UserError("data.options.shapes needs data.options.num_records > 0")
        chosen = shapes_captions(str(options["shapes"]), n, str(options.get("caption", "caption")))
    folder = data_config.get("tokenizer") or str(BUILTIN["shapes"] / "tokenizer")
    return Prompts(chosen, text.load_tokenizer(Path(folder)))
