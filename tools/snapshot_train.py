#!/usr/bin/env python
"""A pipeline folder from a `jaxdiff train` run's checkpoint: its UNet (EMA params by default) with the VAE, text
encoder, tokenizer and scheduler of a base pipeline, ready for `jaxdiff generate` and tools/eval_shapes.py.

  python tools/snapshot_train.py --config configs/train/shapes.py:v3 --workdir runs/teacher_v3 \
      --out runs/teacher_v3/snapshot                      # then: python tools/eval_shapes.py --model <out>

The config must be the run's (the same `--config` and `--config.KEY=VALUE` overrides as `jaxdiff train`); --step picks
a checkpoint (default the latest).
The folder is written atomically; an existing --out is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def snapshot(config, workdir: str, out: Path, base: str, step: int | None, use_ema: bool, overwrite: bool) -> dict:
    import jax

    from jaxdiff import fileio
    from jaxdiff.convert import checkpoint
    from jaxdiff.sampling.pipeline import load_pipeline
    from jaxdiff.train import loop

    s = loop.setup(config, jax.devices()[:1])
    if s.model.kind != "unet":
        raise SystemExit(f"snapshot_train: the run trains a {s.model.kind}, not a UNet")
    state, _, meta = loop.restore(config, workdir, step, devices=jax.devices()[:1])
    params = state.ema_params("unet") if use_ema else state.params["unet"]
    unet = dataclasses.replace(s.model, params=jax.device_get(params))
    pipe = load_pipeline(base)
    models = {"unet": unet, "vae": pipe.vae, "text_encoder": pipe.text_encoders[0]}
    checkpoint.save_pipeline(pipe.path, out, models, overwrite=overwrite)
    info = {"workdir": workdir, "step": int(meta["step"]), "ema": use_ema, "base": str(pipe.path)}
    fileio.atomic_write_text(out / "training.json", json.dumps(info, indent=2) + "\n")  # not the base's record
    return {"out": str(out), **info}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the run's training config, as given to `jaxdiff train`")
    p.add_argument("--workdir", required=True, help="the run's workdir (its checkpoints/)")
    p.add_argument("--out", required=True, help="the pipeline folder to write")
    p.add_argument("--base", default="shapes", help="pipeline whose VAE, text encoder, tokenizer and scheduler to use")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--no-ema", action="store_true", help="the raw params instead of the EMA")
    p.add_argument("--overwrite", action="store_true")
    args, rest = p.parse_known_args(argv)
    overrides = [a for a in rest if a.startswith("--config.")]
    if len(overrides) != len(rest):
        p.error(f"unrecognized arguments: {' '.join(a for a in rest if not a.startswith('--config.'))}")
    from jaxdiff.config import load_config
    from jaxdiff.train import config as config_lib

    config = config_lib.apply_overrides(load_config(args.config), overrides)  # as `jaxdiff train` reads it
    try:
        info = snapshot(config, args.workdir, Path(args.out), args.base, args.step, not args.no_ema, args.overwrite)
    except (FileExistsError, FileNotFoundError) as e:  # --out exists; no checkpoint in --workdir
        print(f"snapshot_train: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
