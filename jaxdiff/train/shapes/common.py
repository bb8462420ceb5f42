"""What the shapes stages share: the options, hyper-parameters, workdir (logs, done markers), data cache, tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import jaxdiff
from jaxdiff.convert import checkpoint
from jaxdiff.data import shapes as S
from jaxdiff.train.shapes.models import MAX_TOKENS

STAGES = ("clip", "vae", "probe", "unet", "decoder", "package")
LABELS = ("shape", "colour", "size", "position", "num_objects", "background")
DEFAULT_ASSETS = Path(jaxdiff.__file__).resolve().parent / "assets"

# Steps and batch sizes: (full, smoke). The small stages train with AdamW, warm-up + cosine to 10%, clip 1.
HPARAMS = {
    "clip": {"steps": (500, 6), "batch": (128, 32), "lr": 1e-3, "warmup": 50, "weight_decay": 0.05},
    "vae": {"steps": (900, 6), "batch": (32, 16), "lr": 1e-3, "warmup": 50, "weight_decay": 0.01, "kl_weight": 1e-6},
    "decoder": {"steps": (1500, 6), "batch": (32, 16), "lr": 5e-4, "warmup": 50, "weight_decay": 0.01},
    "probe": {"steps": (1500, 6), "batch": (128, 32), "lr": 2e-3, "warmup": 50, "weight_decay": 0.01},
    "unet": {
        "batch": (64, 16),
        "lr": 5e-4,
        "warmup": 300,
        "ema": 0.9995,
        "min_snr": 5.0,
        "drop": 0.1,
        "smoke_steps": 6,
        "min_steps": 500,
    },
}


@dataclasses.dataclass
class Options:
    """tools/train_shapes.py's flags (see its --help)."""

    workdir: str = "runs/shapes_train"
    stage: str = "all"
    assets: str | None = None  # default jaxdiff/assets; <workdir>/assets with smoke
    snapshot_out: str | None = None
    smoke: bool = False
    tiny: bool = False
    unet_minutes: float | None = None
    unet_steps: int | None = None
    clip_steps: int | None = None
    vae_steps: int | None = None
    probe_steps: int | None = None
    decoder_steps: int | None = None
    num_examples: int | None = None
    generate_data: bool = False
    save_every: int = 200
    seed: int = 0
    redo: bool = False

    def __post_init__(self):
        if self.assets is None:
            self.assets = str(Path(self.workdir) / "assets") if self.smoke else str(DEFAULT_ASSETS)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Run:
    """The workdir of one training of the shapes models: per-stage folders, log.jsonl, done markers, data."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.workdir = Path(opts.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.smoke, self.tiny = opts.smoke, opts.tiny
        self.log_path = self.workdir / "log.jsonl"
        self._data = {}

    def hp(self, stage: str, key: str):
        value = HPARAMS[stage][key]
        return value[1 if self.smoke else 0] if isinstance(value, tuple) else value

    def steps(self, stage: str) -> int:
        """The stage's step count: its --<stage>-steps flag, else the (smoke) default."""
        return getattr(self.opts, f"{stage}_steps") or self.hp(stage, "steps")

    def dir(self, stage: str) -> Path:
        d = self.workdir / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def train_dir(self, stage: str) -> Path:
        """The runner's workdir of a stage: orbax checkpoints (resume), config.json, metrics.jsonl, tensorboard/."""
        return self.dir(stage) / "train"

    def log(self, record: dict) -> None:
        record = {"time": round(time.time(), 1), **record}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def done(self, stage: str) -> dict | None:
        path = self.workdir / stage / "done.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def mark_done(self, stage: str, info: dict) -> None:
        atomic_write_text(self.dir(stage) / "done.json", json.dumps(info, indent=2) + "\n")
        self.log({"stage": stage, "event": "done", **info})
        print(f"[{stage}] done: {json.dumps(info)}", flush=True)

    def data(self, split: str) -> dict:
        """images uint8 [N, 32, 32, 3], captions (train templates), labels; cached in the workdir."""
        if split in self._data:
            return self._data[split]
        n = self.opts.num_examples or (2048 if self.smoke else None)
        cache = self.workdir / f"data_{split}{'' if n is None else f'_{n}'}.npz"
        if cache.is_file():
            z = np.load(cache, allow_pickle=False)
            out = {k: z[k] for k in z.files}
        else:
            out = _load_split(split, n, generate=self.generates_data)
            tmp = cache.with_name(cache.name + ".tmp.npz")
            np.savez(tmp, **out)
            os.replace(tmp, cache)
        out["captions"] = out["captions"].astype(str)
        self._data[split] = out
        return out

    @property
    def generates_data(self) -> bool:
        """Examples rendered directly (the same per-index generator as the TFDS builder) instead of read via TFDS."""
        return self.smoke or self.opts.generate_data

    def heldout_captions(self, split: str, n: int) -> list[str]:
        """The first `n` examples' captions from the held-out templates (never trained on)."""
        from jaxdiff.data.shapes_tfds import load_shapes, make_example

        if self.generates_data:
            return [make_example(split, i, 32)["heldout_caption"] for i in range(n)]
        items = load_shapes(split).__getitems__(list(range(n)))
        return [_text(it["heldout_caption"]) for it in items]

    def tokenizer(self):
        from jaxdiff.data.tokenizer import build_clip_tokenizer
        from jaxdiff.sampling import text

        folder = self.dir("clip") / "tokenizer"
        if not (folder / "tokenizer_config.json").is_file():
            tmp = folder.with_name("tokenizer.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            build_clip_tokenizer(vocabulary_words(), tmp, MAX_TOKENS)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        return text.load_tokenizer(folder)


def vocabulary_words() -> list[str]:
    """Every word of the train and held-out templates, phrasings, vocabularies and backgrounds."""
    texts = []
    for table in (S.TRAIN_TEMPLATES, S.HELDOUT_TEMPLATES):
        for templates in table.values():
            texts += [re.sub(r"\{\w+\}", " ", t) for t in templates]
    for phrases in (*S.TRAIN_PHRASES.values(), *S.HELDOUT_PHRASES.values(), *S.SYNONYMS.values()):
        texts += list(phrases)
    texts += list(S.SHAPES + S.COLOURS + S.SIZES + S.POSITIONS + S.BACKGROUNDS)
    return sorted({w for t in texts for w in re.findall(r"[a-z]+", t.lower())})


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _load_split(split: str, n: int | None, generate: bool) -> dict:
    if generate:
        from jaxdiff.data.shapes_tfds import ShapesConfig, make_example

        # The split's size in the TFDS builder, or the first --num-examples of it.
        size = getattr(ShapesConfig(name="default"), f"num_{split}")
        n = size if n is None else min(n, size)
        items = (make_example(split, i, 32) for i in range(n))
    else:
        from jaxdiff.data.shapes_tfds import load_shapes

        source = load_shapes(split)
        total = len(source) if n is None else min(n, len(source))
        items = (
            item
            for start in range(0, total, 5000)
            for item in source.__getitems__(list(range(start, min(start + 5000, total))))
        )
    cols = {k: [] for k in ("images", "captions", *LABELS)}
    for item in tqdm(items, desc=f"data {split}", total=n, mininterval=5):
        cols["images"].append(item["image"])
        cols["captions"].append(_text(item["caption"]))
        for k in LABELS:
            cols[k].append(item[k])
    out = {k: np.asarray(v) for k, v in cols.items()}
    out["images"] = out["images"].astype(np.uint8)
    out["captions"] = out["captions"].astype(np.str_)
    return out


def labels_of(data: dict) -> dict:
    return {k: data[k] for k in LABELS}


def to_images(x_uint8) -> np.ndarray:
    """uint8 images -> float32 in [0, 1]."""
    return np.asarray(x_uint8, np.float32) / 255.0


def tokenize(tokenizer, captions) -> np.ndarray:
    from jaxdiff.sampling import text

    return text.tokenize(tokenizer, list(captions))


def ship(src: Path, dst: Path) -> None:
    """Copy a model folder into the assets, replacing it atomically."""
    with checkpoint.atomic_directory(dst, overwrite=True) as tmp:
        for f in src.iterdir():
            shutil.copyfile(f, tmp / f.name)


def read_metrics(workdir: Path) -> list[dict]:
    """The rows of a runner workdir's metrics.jsonl."""
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
