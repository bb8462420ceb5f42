"""The shapes world as a trainer data source: `image` uint8 [S, S, 3] and the caption's CLIP token ids `input_ids`.

Use it as `data.source = "jaxdiff.data.shapes_source:captioned"` (see configs/train/shapes.py); `data.options` may
set size (32 or 64), caption ("caption", or "heldout_caption" for the held-out phrasings), num_records (0 = the
whole split) and generate (render each example on demand instead of reading the prepared TFDS data).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from jaxdiff.sampling import text


class RenderedShapes:
    """Examples `make_example(split, i, size)` for i < num_records, rendered when read (no TFDS preparation)."""

    def __init__(self, split: str, num_records: int, size: int = 32):
        self.split, self.num_records, self.size = split, int(num_records), int(size)

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict[str, Any]:
        from jaxdiff.data.shapes_tfds import make_example

        if not 0 <= index < self.num_records:
            raise IndexError(index)
        return make_example(self.split, int(index), self.size)


class TokenizedCaptions:
    """A random-access source whose records' `text_key` caption becomes `ids_key` token ids [L] int32.

    Every numeric feature is kept; text features are dropped (the trainer batches arrays only). Captions repeat,
    so their ids are cached.
    """

    def __init__(self, records, tokenizer, text_key: str = "caption", ids_key: str = "input_ids", limit: int = 0):
        self.records, self.tokenizer, self.text_key, self.ids_key = records, tokenizer, text_key, ids_key
        self.num_records = min(len(records), limit) if limit else len(records)
        self._ids: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_records

    def ids(self, caption: str) -> np.ndarray:
        if caption not in self._ids:
            self._ids[caption] = text.tokenize(self.tokenizer, [caption])[0]
        return self._ids[caption]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.num_records:
            raise IndexError(index)
        record = self.records[int(index)]
        caption = record[self.text_key]
        out = {k: np.asarray(v) for k, v in record.items() if not isinstance(v, (str, bytes))}
        out[self.ids_key] = self.ids(caption.decode() if isinstance(caption, bytes) else str(caption))
        return out


def captioned(data_config) -> TokenizedCaptions:
    """`data.split` of the shapes world with tokenized captions; the tokenizer is `data.tokenizer` (a tokenizer
    folder, which the trainer sets to the model's when empty), else the built-in shapes pipeline's."""
    from jaxdiff.sampling.pipeline import BUILTIN

    options = dict(data_config.get("options", {}) or {})
    unknown = set(options) - {"size", "caption", "num_records", "generate"}
    if unknown:
        raise ValueError(f"data.options: unknown keys {sorted(unknown)} (size, caption, num_records, generate)")
    size, limit = int(options.get("size", 32)), int(options.get("num_records", 0))
    folder = data_config.tokenizer or str(BUILTIN["shapes"] / "tokenizer")
    tokenizer = text.load_tokenizer(Path(folder))
    if options.get("generate", False):
        if not limit:
            raise ValueError("data.options.generate renders examples on demand: set data.options.num_records")
        records = RenderedShapes(data_config.split, limit, size)
    else:
        from jaxdiff.data.shapes_tfds import load_shapes

        records = load_shapes(data_config.split, data_config.data_dir or None, size)
    return TokenizedCaptions(records, tokenizer, text_key=options.get("caption", "caption"), limit=limit)
