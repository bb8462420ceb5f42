#!/usr/bin/env python
"""Judge the `shapes` text-to-image model with the probe on prompts from the HELD-OUT templates.

For N single-object and N two-object scenes (deterministic, from --seed) it writes a held-out caption,
generates an image (25 DDIM steps by default, classifier-free guidance), and lets the probe read it back:

  single objects: shape and colour accuracy (and position accuracy over prompts that state a position)
  two objects:    per-slot (left / right) shape and colour accuracy, and the object count
  both:           Fréchet distance on the probe's penultimate features between the generated images and
                  renders of the prompted scenes, next to the same distance between those renders and the
                  same scenes rendered again with fresh position jitter (what N samples give between
                  two real sets); and the probe on VAE reconstructions of the renders (the VAE's ceiling)

  python tools/eval_shapes.py                                   # the built-in model, N=200, out/eval_shapes
  python tools/eval_shapes.py --guidance 3 5 7.5 --n 48         # a small sweep
  python tools/eval_shapes.py --model runs/shapes_train/snapshot --out /tmp/eval

Writes results.json, results.md (a markdown table) and samples.png (a grid) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jaxdiff.data import shapes as S  # noqa: E402
from jaxdiff.metrics import frechet, pixel_judge  # noqa: E402
from jaxdiff.metrics import probe as probe_lib  # noqa: E402

DEFAULT_GUIDANCE = 5.0


def heldout_prompts(n: int, num_objects: int, seed: int) -> tuple[list[str], list[S.Scene]]:
    """n deterministic scenes with `num_objects` objects and a held-out caption each."""
    rng = np.random.default_rng([seed, num_objects, 12345])
    scenes = [S.sample_scene(rng, num_objects=num_objects) for _ in range(n)]
    prompts = [S.caption(scene, rng, "heldout") for scene in scenes]
    return prompts, scenes


def rejittered(scenes: list[S.Scene], seed: int, jitter: float = 0.03) -> list[S.Scene]:
    """The same scenes (shapes, colours, sizes, positions, background) with new small offsets, as sample_scene draws."""
    rng = np.random.default_rng([seed, 777])
    return [
        dataclasses.replace(
            s,
            objects=tuple(
                dataclasses.replace(o, dx=float(rng.uniform(-jitter, jitter)), dy=float(rng.uniform(-jitter, jitter)))
                for o in s.objects
            ),
        )
        for s in scenes
    ]


def real_renders(scenes: list[S.Scene]) -> np.ndarray:
    return np.stack([S.render(s) for s in scenes]).astype(np.float32) / 255.0


def generate(
    pipe, prompts: list[str], guidance: float, steps: int, scheduler: str, seed: int, batch: int
) -> np.ndarray:
    out = []
    for b, start in enumerate(range(0, len(prompts), batch)):
        chunk = prompts[start : start + batch]
        pad = batch - len(chunk) if len(prompts) > batch else 0  # one compiled shape
        images = pipe(chunk + [chunk[-1]] * pad, steps=steps, guidance=guidance, scheduler=scheduler, seed=seed + b)
        out.append(images[: len(chunk)])
    return np.concatenate(out)


def judge(probe, images: np.ndarray, scenes: list[S.Scene], prompts: list[str], real_feats: np.ndarray) -> dict:
    preds, feats = probe(images)
    labels = [S.scene_labels(s) for s in scenes]
    shape = np.stack([lab["shape"] for lab in labels])
    colour = np.stack([lab["colour"] for lab in labels])
    n_obj = np.asarray([len(s.objects) for s in scenes])
    res = {"n": len(scenes), "count_acc": float(np.mean(preds["num_objects"] + 1 == n_obj))}
    if n_obj[0] == 1:
        res["shape_acc"] = float(np.mean(preds["shape0"] == shape[:, 0]))
        res["colour_acc"] = float(np.mean(preds["colour0"] == colour[:, 0]))
        res["both_acc"] = float(np.mean((preds["shape0"] == shape[:, 0]) & (preds["colour0"] == colour[:, 0])))
        stated = [S.parse_prompt(p)["objects"][0]["position"] is not None for p in prompts]
        pos = np.asarray([S.POSITIONS.index(s.objects[0].position) for s in scenes])
        m = np.asarray(stated)
        if m.any():
            res["position_acc_when_stated"] = float(np.mean(preds["position0"][m] == pos[m]))
            res["position_stated_n"] = int(m.sum())
    else:
        for slot, name in ((0, "left"), (1, "right")):
            res[f"{name}_shape_acc"] = float(np.mean(preds[f"shape{slot}"] == shape[:, slot]))
            res[f"{name}_colour_acc"] = float(np.mean(preds[f"colour{slot}"] == colour[:, slot]))
        res["shape_acc"] = (res["left_shape_acc"] + res["right_shape_acc"]) / 2
        res["colour_acc"] = (res["left_colour_acc"] + res["right_colour_acc"]) / 2
        res["all_correct"] = float(
            np.mean(
                (preds["shape0"] == shape[:, 0])
                & (preds["colour0"] == colour[:, 0])
                & (preds["shape1"] == shape[:, 1])
                & (preds["colour1"] == colour[:, 1])
            )
        )
    res["frechet"] = frechet.frechet_distance_from_features(feats, real_feats)
    # The second, non-learned judge (metrics/pixel_judge.py) on the same images: an invalid image (no object, too
    # many, fragments, an unknown shape or colour) is wrong on every attribute.
    batched = {k: np.stack([lab[k] for lab in labels]) for k in labels[0]}
    pix = pixel_judge.judge(images, int(n_obj[0]))
    acc = pixel_judge.accuracy(pix, batched)
    slots = ("shape0", "colour0") if n_obj[0] == 1 else ("shape0", "colour0", "shape1", "colour1")
    res["pixel_valid"] = acc["valid"]
    res["pixel_shape_acc"] = float(np.mean([acc[h] for h in slots if h.startswith("shape")]))
    res["pixel_colour_acc"] = float(np.mean([acc[h] for h in slots if h.startswith("colour")]))
    res["pixel_all_correct"] = acc["all"]
    agree = pix["valid"].copy()
    for h in slots:
        key, slot = pixel_judge.HEADS[h]
        agree &= pix[key][:, slot] == preds[h]
    res["judges_agree"] = float(agree.mean())
    return res


def save_grid(path: Path, images: np.ndarray, columns: int = 8, scale: int = 2) -> None:
    from PIL import Image

    n = len(images)
    rows = -(-n // columns)
    h, w = images.shape[1:3]
    grid = np.ones((rows * (h + 2) + 2, columns * (w + 2) + 2, 3), np.float32)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + c * (w + 2) : 2 + c * (w + 2) + w] = im
    img = Image.fromarray(np.clip(np.rint(grid * 255), 0, 255).astype(np.uint8))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def _cell(rate: float, n: int) -> str:
    """A rate with its 95 % Wilson interval."""
    z, k = 1.96, rate * n
    centre = (k + z * z / 2) / (n + z * z)
    half = z * np.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return f"{rate:.1%} [{max(0, centre - half):.0%}, {min(1, centre + half):.0%}]"


def markdown(results: dict) -> str:
    n = results["n"]
    lines = [
        f"Model `{results['model']}`, {results['steps']} {results['scheduler'].upper()} steps, "
        f"N = {n} prompts per row from the held-out templates; each rate with its 95 % Wilson interval. "
        "Two judges: the learned probe (forced choice) and the non-learned pixel judge (an invalid image is wrong).",
        "",
        "| guidance | prompts | shape: probe | shape: pixel | colour: probe | colour: pixel | pixel valid "
        "| judges agree | count (probe) | Fréchet (probe feats) | real vs real |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [(g, kind, r[kind]) for g, r in results["by_guidance"].items() for kind in ("single", "two")]
    rows += [("VAE recon. of real", kind, results["vae_reconstruction"][kind]) for kind in ("single", "two")]
    for g, kind, x in rows:
        k = x.get("n", n)
        lines.append(
            f"| {g} | {'one object' if kind == 'single' else 'two objects (per slot)'} | {_cell(x['shape_acc'], k)} | "
            f"{_cell(x['pixel_shape_acc'], k)} | {_cell(x['colour_acc'], k)} | {_cell(x['pixel_colour_acc'], k)} | "
            f"{_cell(x['pixel_valid'], k)} | {_cell(x['judges_agree'], k)} | {x['count_acc']:.1%} | "
            f"{x['frechet']:.2f} | {results['frechet_floor'][kind]:.2f} |"
        )
    lines += [
        "",
        "Two objects: shape/colour accuracy is the mean of the left and right slots. The judges agree on an image "
        "when the pixel judge finds it valid and both name the same shape and colour in every slot. Fréchet: "
        "distance on the probe's features to renders of the prompted scenes; 'real vs real': the same between "
        "those renders and a re-render with fresh jitter (the estimator's floor at this N). Single objects: "
        "position accuracy over prompts stating a position: "
        + ", ".join(
            f"g={g}: {r['single'].get('position_acc_when_stated', float('nan')):.1%}"
            for g, r in results["by_guidance"].items()
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes", help="pipeline folder or built-in name (default: shapes)")
    p.add_argument("--probe", default=None, help="probe folder (default: jaxdiff/assets/shapes_probe)")
    p.add_argument("--n", type=int, default=200, help="prompts per kind (single, two objects)")
    p.add_argument("--guidance", type=float, nargs="+", default=[DEFAULT_GUIDANCE], help="guidance scale(s)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=100, help="images per compiled sampling call")
    p.add_argument("--grid", type=int, default=32, help="samples of each kind in samples.png")
    p.add_argument("--out", default="out/eval_shapes")
    args = p.parse_args(argv)

    import jax

    from jaxdiff.sampling.pipeline import load_pipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    pipe = load_pipeline(args.model)
    probe = probe_lib.load_probe(args.probe)
    sets = {kind: heldout_prompts(args.n, k, args.seed) for kind, k in (("single", 1), ("two", 2))}
    real_feats, floor = {}, {}
    for kind, (_, scenes) in sets.items():
        _, real_feats[kind] = probe(real_renders(scenes))
        # The same scenes rendered again with fresh position jitter: what the estimator gives between two real
        # sets for the same prompts (with N samples of 128-d features it is far from 0).
        _, other_feats = probe(real_renders(rejittered(scenes, args.seed)))
        floor[kind] = frechet.frechet_distance_from_features(other_feats, real_feats[kind])
    # The VAE's own ceiling: the probe on reconstructions (encode -> mean -> decode) of the prompted scenes.
    recon_fn = jax.jit(lambda p, x: (pipe.vae.decode(p, pipe.vae.encode(p, x * 2 - 1)[0]) / 2 + 0.5).clip(0, 1))
    ceiling = {}
    for kind, (prompts, scenes) in sets.items():
        rec = np.asarray(recon_fn(pipe.vae.params, real_renders(scenes)))
        ceiling[kind] = judge(probe, rec, scenes, prompts, real_feats[kind])
        print(f"vae reconstructions {kind}: {json.dumps(ceiling[kind])}", flush=True)
    results = {
        "model": str(args.model),
        "steps": args.steps,
        "scheduler": args.scheduler,
        "n": args.n,
        "seed": args.seed,
        "frechet_floor": floor,
        "vae_reconstruction": ceiling,
        "by_guidance": {},
        "prompts_example": {},
    }
    grid = []
    for g in args.guidance:
        r = {}
        for kind, (prompts, scenes) in sets.items():
            t = time.time()
            images = generate(pipe, prompts, g, args.steps, args.scheduler, args.seed, args.batch)
            r[kind] = judge(probe, images, scenes, prompts, real_feats[kind])
            r[kind]["seconds"] = round(time.time() - t, 1)
            print(f"guidance {g} {kind}: {json.dumps(r[kind])}", flush=True)
            if g == args.guidance[0]:
                grid.append(images[: args.grid])
                results["prompts_example"][kind] = prompts[: min(8, len(prompts))]
        results["by_guidance"][str(g)] = r
    results["seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    save_grid(out / "samples.png", np.concatenate(grid))
    print(markdown(results))
    print(f"wrote {out}/results.json, results.md, samples.png ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
