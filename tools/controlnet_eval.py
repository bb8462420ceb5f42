#!/usr/bin/env python
"""Measure how often a shapes ControlNet puts the object in the condition's mask; writes docs/controlnet_shapes.md.

    python tools/controlnet_eval.py --controlnet runs/controlnet_shapes_mask/controlnet        # N = 200
    python tools/controlnet_eval.py --controlnet /tmp/cn/controlnet --n 8 --doc /tmp/cn.md     # a smoke check

On N held-out scenes (their own seed stream, never a training step's; held-out-template captions) it generates with
and without the ControlNet from the same starting noise (25 DDIM steps, the model's default guidance) and reports:
IoU of the pixel judge's segmented object(s) with the scene's exact mask (mean, 95 % interval), the fraction with
IoU >= 0.5 (95 % Wilson interval), and shape / colour accuracy by the probe and by the pixel judge (an invalid image
is wrong), so one sees the prompt is still obeyed. Writes the markdown (--doc), a PNG grid beside it (one scene per
row: condition | without | with) and the numbers as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TRAIN_COMMAND = "jaxdiff controlnet-train --config configs/controlnet/shapes_mask.py --out runs/controlnet_shapes_mask"
FULL_COMMAND = "python tools/controlnet_eval.py --controlnet runs/controlnet_shapes_mask/controlnet --n 200"
FULL_N = 200
GRID_ROWS = 12


def _run_config(controlnet: Path) -> dict:
    """The controlnet-train config of the run that wrote `controlnet` (OUT/config.json), {} when there is none."""
    try:
        return json.loads((controlnet.parent / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _cell(r: dict) -> str:
    lo, hi = r["ci"]
    return f"{r['rate']:.1%} ({lo:.0%}–{hi:.0%})"


def markdown(res: dict) -> str:
    rows = [("without ControlNet", res["without"]), ("with ControlNet", res["with"])]
    full = res["n"] >= FULL_N
    lines = [
        "# ControlNet on the shapes world: does the object land in the mask?",
        "",
        f"Train: `{TRAIN_COMMAND}`  ",
        f"Measure: `{FULL_COMMAND}`",
        "",
        f"This page: `{res['command']}`"
        + (
            ""
            if full
            else f" (a smoke check with N = {res['n']}: the numbers are not meaningful; the full run is the "
            "command above)"
        ),
        "",
        f"ControlNet `{res['controlnet']}` ({res['condition']} condition, scale {res['scale']}) on `{res['model']}`; "
        f"N = {res['n']} held-out scenes (seed {res['seed']}, {res['two_objects']} with two objects), captions from "
        f"the held-out templates, {res['steps']} DDIM steps, guidance {res['guidance']}, the same starting noise with "
        f"and without. {res['seconds']:.0f} s.",
        "",
        "| | IoU with the mask (mean, 95 %) | IoU >= 0.5 | shape: probe | shape: pixel | colour: probe "
        "| colour: pixel | pixel valid |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lo, hi = r["iou_ci"]
        lines.append(
            f"| {name} | {r['iou_mean']:.3f} ({lo:.3f}–{hi:.3f}) | {_cell(r['hit'])} | {_cell(r['probe_shape'])} | "
            f"{_cell(r['pixel_shape'])} | {_cell(r['probe_colour'])} | {_cell(r['pixel_colour'])} | "
            f"{_cell(r['pixel_valid'])} |"
        )
    lines += [
        "",
        "IoU: the pixel judge's segmented object(s) (pixels at least half covered; specks and fragments left out) "
        "against the scene's exact mask (`jaxdiff.data.shapes.render_mask`, pixels at least half covered); an image "
        "with no object has IoU 0. A shape or colour is right when every object's is (the probe reads slots left to "
        "right; the pixel judge also needs a valid image). Rates with 95 % Wilson intervals; the IoU mean with a "
        "normal-approximation interval.",
        "",
        f"![condition | without | with]({res['grid']})",
        "",
        f"{res['grid']}: one held-out scene per row: its condition image, then the sample without and with the "
        "ControlNet (same noise).",
    ]
    return "\n".join(lines) + "\n"


def grid(prompts, conditions, without, with_) -> np.ndarray:
    from jaxdiff.images import labeled_rows

    rows = [
        (textwrap.fill(p, 32), np.stack([c.astype(np.float32) / 255.0, a, b]))
        for p, c, a, b in zip(prompts, conditions, without, with_)
    ]
    return labeled_rows(rows[:GRID_ROWS], label_width=200)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--controlnet", required=True, help="a ControlNet folder (OUT/controlnet of controlnet-train)")
    p.add_argument("--model", default=None, help="pipeline (default: the run's config.model, else shapes)")
    p.add_argument("--condition", choices=("mask", "edges"), default=None, help="default: the run's")
    p.add_argument("--n", type=int, default=FULL_N, help=f"held-out scenes (default {FULL_N})")
    p.add_argument("--seed", type=int, default=0, help="held-out scenes and starting noise")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    p.add_argument("--guidance", type=float, default=None, help="default: the model's sampling_defaults.json")
    p.add_argument("--scale", type=float, default=1.0, help="controlnet_scale (default 1)")
    p.add_argument("--batch", type=int, default=50, help="images per sampling call")
    p.add_argument("--doc", default="docs/controlnet_shapes.md", help="markdown to write (PNG and JSON beside it)")
    args = p.parse_args(argv)

    from jaxdiff.control import data, evaluate
    from jaxdiff.generate import enable_compilation_cache, model_defaults
    from jaxdiff.images import save_png
    from jaxdiff.metrics.probe import load_probe
    from jaxdiff.sampling.pipeline import load_pipeline

    enable_compilation_cache()
    controlnet = Path(args.controlnet)
    run = _run_config(controlnet)
    model = args.model or run.get("model", "shapes")
    condition = args.condition or run.get("condition", "mask")
    edge_width = float(run.get("edge_width", 1.0))
    pipe = load_pipeline(model, controlnet=controlnet)
    guidance = args.guidance if args.guidance is not None else float(model_defaults(pipe.path).get("guidance", 7.5))
    size, batch = pipe.default_size, min(args.batch, args.n)

    t0 = time.perf_counter()
    scenes, prompts = evaluate.heldout_scenes(args.n, args.seed)
    conditions = np.stack([data.condition_image(s, condition, size, edge_width) for s in scenes])
    latents = evaluate.starting_noise(pipe, args.n, args.seed)
    without = evaluate.generate(pipe, prompts, latents, args.steps, guidance, batch)
    with_ = evaluate.generate(pipe, prompts, latents, args.steps, guidance, batch, conditions, args.scale)
    probe = load_probe()
    doc = Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    grid_path = doc.with_suffix(".png")
    save_png(grid_path, grid(prompts, conditions, without, with_))
    res = {
        "command": " ".join(
            ["python", "tools/controlnet_eval.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
        ),
        "controlnet": str(controlnet),
        "model": str(model),
        "condition": condition,
        "scale": args.scale,
        "n": args.n,
        "seed": args.seed,
        "two_objects": sum(len(s.objects) == 2 for s in scenes),
        "steps": args.steps,
        "guidance": guidance,
        "without": evaluate.measure(without, scenes, probe),
        "with": evaluate.measure(with_, scenes, probe),
        "grid": grid_path.name,
    }
    res["seconds"] = time.perf_counter() - t0
    doc.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    doc.write_text(markdown(res))
    for name in ("without", "with"):
        r = res[name]
        print(
            f"{name:>7} ControlNet: IoU {r['iou_mean']:.3f}, IoU>=0.5 {_cell(r['hit'])}, shape probe/pixel "
            f"{r['probe_shape']['rate']:.0%}/{r['pixel_shape']['rate']:.0%}, colour probe/pixel "
            f"{r['probe_colour']['rate']:.0%}/{r['pixel_colour']['rate']:.0%} (N={r['n']})"
        )
    print(f"wrote {doc}, {grid_path}, {doc.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
