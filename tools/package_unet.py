#!/usr/bin/env python
"""Package a `jaxdiff train` run's UNet (its EMA params by default) as a pipeline beside a base pipeline's other
components (VAE, text encoder, tokenizer, scheduler, sampling defaults): how the shapes teacher of
configs/train/shapes.py:v2 becomes jaxdiff/assets/shapes.

  python tools/package_unet.py --workdir runs/teacher_v2 --config configs/train/shapes.py:v2 --out /tmp/teacher_v2
  python tools/package_unet.py ... --out jaxdiff/assets/shapes --overwrite          # ship it
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="the `jaxdiff train --workdir` of the run")
    p.add_argument("--config", required=True, help="the run's config, e.g. configs/train/shapes.py:v2")
    p.add_argument("--base", default="shapes", help="pipeline whose other components go with it (default: shapes)")
    p.add_argument("--out", required=True, help="pipeline folder to write (atomically)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--raw", action="store_true", help="the raw params instead of the EMA")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    import dataclasses
    import tempfile

    import jax

    from jaxdiff.api import init_model
    from jaxdiff.config import load_config
    from jaxdiff.convert import checkpoint
    from jaxdiff.sampling.pipeline import resolve
    from jaxdiff.train import loop

    config = load_config(args.config)
    state, _, meta = loop.restore(config, args.workdir, args.step, devices=jax.devices()[:1])
    params = jax.device_get(state.params["unet"] if args.raw else state.ema_params("unet"))
    unet = init_model({"_class_name": "UNet2DConditionModel", **config.model.unet.to_dict()}, abstract=True)
    unet = dataclasses.replace(unet, params=params)
    base = resolve(args.base)
    models = {k: v for k, v in checkpoint.load_components(base).items() if k != "unet"}
    models["unet"] = unet
    # The base is copied before the destination is replaced: --base and --out may be the same folder.
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "base"
        checkpoint.save_pipeline(base, staged, models)
        trained = {"workdir": args.workdir, "config": args.config, "step": int(meta["step"]), "ema": not args.raw}
        (staged / "training.json").write_text(json.dumps(trained, indent=2) + "\n")
        checkpoint.save_pipeline(staged, args.out, checkpoint.load_components(staged), overwrite=args.overwrite)
    print(f"wrote {args.out}: UNet step {meta['step']} ({'raw' if args.raw else 'EMA'}) with {base}'s other parts")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
