#!/usr/bin/env python
"""Train the embedded `shapes` text-to-image models on the CPU and write them as a jaxdiff pipeline.

Stages (jaxdiff/train/shapes/, one module each, all trained by jaxdiff.train.runner: orbax checkpoints in
WORKDIR/<stage>/train every --save-every steps, a killed or preempted run restarts from the last one, a finished
stage is skipped):

  clip     word-level CLIP tokenizer + a transformers-style CLIPTextModel trained contrastively (InfoNCE)
           against a small image CNN (jaxdiff/metrics/shapes_clip.py) on the train captions
  vae      diffusers AutoencoderKL, 32x32x3 -> 8x8x4; then scaling_factor = 1 / std(latent means)
  probe    the judge (jaxdiff/metrics/probe.py): object count, per-slot shape/colour/size, position;
           shipped to jaxdiff/assets/shapes_probe
  unet     diffusers UNet2DConditionModel trained by jaxdiff's trainer (configs/train/shapes.py): images and
           caption ids encoded in the step by the frozen VAE and text encoder above, epsilon prediction with
           SD's betas, 10% caption dropout (classifier-free guidance), AdamW + warmup + cosine, EMA, min-SNR
           weighting; steps from --unet-steps, or fitted to --unet-minutes by a measured s/step, else the
           config's 12000
  decoder  the VAE decoder fine-tuned with the encoder frozen (sharper images; latents, scaling factor and
           the UNet stay valid)
  package  jaxdiff/assets/shapes (a jaxdiff checkpoint laid out like a diffusers StableDiffusionPipeline)
           and jaxdiff/assets/shapes_clip

  python tools/train_shapes.py                                  # everything, in runs/shapes_train
  python tools/train_shapes.py --stage unet                     # one stage
  python tools/train_shapes.py --smoke --workdir /tmp/smoke     # all stages with tiny step counts (~3 min)
  python tools/train_shapes.py --stage snapshot --snapshot-out /tmp/snap   # pipeline from the UNet so far

Exit status: 0 done, 2 a bad flag or a stage resumed with other settings (use the same flags, or --redo it),
3 a non-finite loss or gradient, 75 stopped by SIGTERM after saving (rerun the same command to resume).

The data comes from the TFDS builder (`load_shapes`, set JAXDIFF_DATA_DIR to reuse a prepared copy); --smoke
renders its few examples directly with the same per-index generator.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxdiff.errors import EXIT_NONFINITE, EXIT_PREEMPTED, EXIT_USER_ERROR, Preempted, UserError
from jaxdiff.train.shapes import stages
from jaxdiff.train.shapes.common import STAGES, Options
from jaxdiff.train.step import NonFiniteError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/shapes_train", help="checkpoints, logs and intermediate models")
    p.add_argument(
        "--stage",
        default="all",
        choices=("all", *STAGES, "snapshot"),
        help="run one stage (its inputs must exist); 'snapshot' writes a pipeline from the UNet so far",
    )
    p.add_argument(
        "--assets",
        default=None,
        help="where shapes/, shapes_clip/, shapes_probe/ go (default jaxdiff/assets; <workdir>/assets with --smoke)",
    )
    p.add_argument("--snapshot-out", default=None, help="folder for --stage snapshot (default <workdir>/snapshot)")
    p.add_argument("--smoke", action="store_true", help="tiny step counts and 2048 rendered examples (~3 min)")
    p.add_argument("--tiny", action="store_true", help="tiny model configs (for tests)")
    p.add_argument(
        "--unet-minutes",
        type=float,
        default=None,
        help="UNet time budget, turned into steps by a measured s/step (default: configs/train/shapes.py's steps)",
    )
    p.add_argument("--unet-steps", type=int, default=None, help="fixed number of UNet steps (overrides the budget)")
    p.add_argument("--clip-steps", type=int, default=None)
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--probe-steps", type=int, default=None)
    p.add_argument("--decoder-steps", type=int, default=None)
    p.add_argument("--num-examples", type=int, default=None, help="use only the first N examples of each split")
    p.add_argument("--generate-data", action="store_true", help="render examples directly instead of via TFDS")
    p.add_argument("--save-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--redo", action="store_true", help="run the chosen stage again from step 0 even if it is done")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    # Before the stages import transformers (lazily): the tokenizer and models are local, never fetched.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        return stages.main(Options(**vars(args)), sys.argv[1:] if argv is None else list(argv))
    except UserError as e:
        print(f"train_shapes: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NonFiniteError as e:
        print(f"train_shapes: stopped: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except Preempted as e:
        print(f"train_shapes: {e}", file=sys.stderr)
        return EXIT_PREEMPTED


if __name__ == "__main__":
    sys.exit(main())
