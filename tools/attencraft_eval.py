#!/usr/bin/env python
"""AttenCraft measured on `shapes`: one render (a purple cross left, an orange star right), no masks; writes
docs/attencraft.md, docs/attencraft.json and docs/attencraft.png.

    python tools/attencraft_eval.py                      # train (resumes runs/attencraft), measure, write the docs
    python tools/attencraft_eval.py --n 64 --train-steps 300
    python tools/attencraft_eval.py --report             # the markdown from docs/attencraft.json

Training: `jaxdiff personalize --config configs/personalize/attencraft.py:shapes --token "<a>,<b>"` on the render.
Measures (pixel judge, jaxdiff.metrics.pixel_judge; rates are k/n with 95 % Wilson intervals):
- mask IoU of the derived masks (initial and last accepted, at the 8x8 attention resolution) vs the renderer's exact
  masks pooled to 8x8 (a cell belongs to an object when the object covers at least half of it);
- one-token prompts "a <a>" / "a <b>": exactly one object, and it is the token's object (shape and colour; the token
  is matched to the object its mask overlaps most); cross-contamination: an object of the image shows the OTHER
  concept's shape or colour;
- the two-token prompt "a <a> and a <b>": both objects, each correct (any order);
- drift: the world's plain one-object captions before vs after (same noise): shape and colour both right.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DOCS = ROOT / "docs"
CONFIG = "configs/personalize/attencraft.py:shapes"
TOKENS = ("<a>", "<b>")
# shape, colour, position (large, white background): the spec's held-out pair, and a control pair of the world's own
# vocabulary (the frozen VAE cannot draw purple and rarely a star: docs/personalization.md, docs/anchor_dreambooth.md)
PAIRS = {
    "heldout": (("cross", "purple", "left"), ("star", "orange", "right")),
    "train": (("circle", "red", "left"), ("square", "blue", "right")),
}
OBJECTS = PAIRS["heldout"]
SIDE = 8


def wilson(k, n: int) -> str:
    from jaxdiff.erase.evaluate import wilson_text

    k = k["k"] if isinstance(k, dict) else k
    return "n/a" if n == 0 else f"{k}/{n} = {wilson_text(k, n)}"


def scene():
    from jaxdiff.data import shapes as S

    objs = tuple(S.ShapeObject(s, c, "large", p) for s, c, p in OBJECTS)
    return S.Scene(objs, "white")


def gt_masks(side: int = SIDE) -> np.ndarray:
    """[2, side²] binary: cells at least half covered by the cross / the star (renderer coverage, 32 px, pooled)."""
    from jaxdiff.data import shapes as S

    out = []
    for obj in scene().objects:
        cov = S.coverage(obj, 32)
        k = 32 // side
        out.append((cov.reshape(side, k, side, k).mean((1, 3)) >= 0.5).reshape(-1))
    return np.stack(out).astype(np.float32)


def iou(a, b) -> float:
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0.5
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else float("nan")


def train(args) -> dict:
    from jaxdiff.config import apply_overrides, load_config
    from jaxdiff.data import shapes as S
    from jaxdiff.images import save_png
    from jaxdiff.personalize.run import personalize

    run = Path(args.run)
    images = run.parent / (run.name + "_images")
    images.mkdir(parents=True, exist_ok=True)
    save_png(images / "000.png", S.render(scene(), 32))
    overrides = [f"--config.train.steps={args.train_steps}", f"--config.sample.num_images={args.grid}"]
    config = apply_overrides(load_config(CONFIG), overrides)
    config.images, config.token = str(images.resolve()), ",".join(TOKENS)
    t0 = time.time()
    report = personalize(config, run, progress=False)
    return {**report, "wall_s": time.time() - t0}


def _sample(pipe, prompts, seed, steps, guidance, batch):
    from jaxdiff.erase.evaluate import noise

    side = pipe.default_size // pipe.vae_scale_factor
    z = noise(len(prompts), (side, side, 4), seed)
    return np.concatenate(
        [pipe(prompts[i : i + batch], latents=z[i : i + batch], steps=steps, guidance=guidance)
         for i in range(0, len(prompts), batch)]
    )  # fmt: skip


def measure(args, train_report: dict) -> dict:
    from jaxdiff.data import shapes as S
    from jaxdiff.images import labeled_rows, save_png, to_uint8
    from jaxdiff.metrics import pixel_judge
    from jaxdiff.personalize import attencraft
    from jaxdiff.sampling.pipeline import load_pipeline

    run = Path(args.run)
    d = json.loads((ROOT / "jaxdiff/assets/shapes/sampling_defaults.json").read_text())
    steps, guidance = int(d["steps"]), float(d["guidance"])
    saved = np.load(run / attencraft.MASKS_FILE)
    gt = gt_masks()
    masks = {"initial": saved["initial"]}
    if "final" in saved:
        masks["final"] = saved["final"]
    # token i <-> the object its (final, else initial) mask overlaps most
    ref = masks.get("final", masks["initial"])
    owner = [int(np.argmax([iou(ref[1 + i], gt[j]) for j in range(2)])) for i in range(2)]
    ious = {k: {TOKENS[i]: iou(m[1 + i], gt[owner[i]]) for i in range(2)} for k, m in masks.items()}
    bg_gt = 1.0 - np.clip(gt.sum(0), 0, 1)
    for k, m in masks.items():
        ious[k]["background"] = iou(m[0], bg_gt)

    personal = load_pipeline(run / "model")
    base = load_pipeline("shapes")
    image = S.render(scene(), 32)
    results, grid = {}, [("training image", np.repeat(image[None], 4, 0))]
    # ceiling: the frozen VAE's round trip of the training image, judged (2 objects expected)
    vae = base.vae
    scale = vae.config.get("scaling_factor", 0.18215)
    x = np.asarray(image, np.float32)[None] / 255.0 * 2 - 1
    z = vae.encode(vae.params, x)[0] * scale
    trip = (np.clip(np.asarray(vae.decode(vae.params, z / scale)), -1, 1) + 1) / 2
    v = pixel_judge.judge(trip, expected_objects=2)
    ceiling = {
        "objects": int(v["num_objects"][0]),
        "read": [f"{S.ALL_COLOURS[c]} {S.ALL_SHAPES[h]}" for h, c in zip(v["shape"][0], v["colour"][0]) if h >= 0],
    }
    grid.append(("VAE round trip\n(the ceiling)", (trip * 255).astype(np.uint8)))
    up = lambda m: np.repeat(np.kron(m.reshape(SIDE, SIDE), np.ones((4, 4)))[..., None] * 255, 3, -1)  # noqa: E731
    grid.append(
        (f"renderer masks\n({OBJECTS[0][0]}, {OBJECTS[1][0]})", np.stack([up(gt[0]), up(gt[1])]).astype(np.uint8))
    )
    for k, m in masks.items():
        grid.append((f"{k} masks\n(bg, <a>, <b>)", np.stack([up(x) for x in m]).astype(np.uint8)))
    ids = {"shape": S.ALL_SHAPES, "colour": S.ALL_COLOURS}
    for i, tok in enumerate(TOKENS):
        shape, colour, _ = OBJECTS[owner[i]]
        o_shape, o_colour, _ = OBJECTS[1 - owner[i]]
        prompt = f"a {tok}"
        im = _sample(personal, [prompt] * args.n, args.seed + i, steps, guidance, args.batch)
        v = pixel_judge.judge(im)
        one = v["num_objects"] == 1
        right = (v["shape"][:, 0] == ids["shape"].index(shape)) & (v["colour"][:, 0] == ids["colour"].index(colour))
        other = ((v["shape"] == ids["shape"].index(o_shape)) | (v["colour"] == ids["colour"].index(o_colour))).any(1)
        second = v["num_objects"] >= 2
        results[prompt] = {
            "n": args.n,
            "object": f"{colour} {shape}",
            "one_correct": int((one & right).sum()),
            "one_object": int(one.sum()),
            "shape": int((v["shape"][:, 0] == ids["shape"].index(shape)).sum()),
            "colour": int((v["colour"][:, 0] == ids["colour"].index(colour)).sum()),
            "other_attribute": int(other.sum()),
            "second_object": int(second.sum()),
            "contaminated": int((other | second).sum()),
        }
        grid.append((prompt, im[: args.grid]))
    prompt = f"a {TOKENS[0]} and a {TOKENS[1]}"
    im = _sample(personal, [prompt] * args.n, args.seed + 2, steps, guidance, args.batch)
    v = pixel_judge.judge(im, expected_objects=2)
    want = {(ids["shape"].index(s), ids["colour"].index(c)) for s, c, _ in OBJECTS}
    got = [{(int(v["shape"][j, k]), int(v["colour"][j, k])) for k in range(2)} for j in range(args.n)]
    both = np.asarray([g == want for g in got]) & (v["num_objects"] == 2)
    results[prompt] = {"n": args.n, "both_correct": int(both.sum()), "two_objects": int((v["num_objects"] == 2).sum())}
    grid.append((prompt, im[: args.grid]))

    rng = np.random.default_rng([args.seed, 3])
    scenes = [S.sample_scene(rng, num_objects=1) for _ in range(args.n_drift)]
    captions = [S.caption(sc, rng) for sc in scenes]
    drift = {}
    for name, pipe in (("base", base), ("attencraft", personal)):
        im = _sample(pipe, captions, args.seed + 5, steps, guidance, args.batch)
        v = pixel_judge.judge(im, expected_objects=1)
        ok = [
            v["shape"][j, 0] == S.ALL_SHAPES.index(sc.objects[0].shape)
            and v["colour"][j, 0] == S.ALL_COLOURS.index(sc.objects[0].colour)
            for j, sc in enumerate(scenes)
        ]
        drift[name] = {"n": args.n_drift, "correct": int(np.sum(ok)), "valid": int(v["valid"].sum())}
        grid.append((f"{name}: world\ncaptions", im[: args.grid]))
    drift["changed_images"] = None
    width = max(len(im) for _, im in grid)  # short rows padded with white cells here (labeled_rows over-pads them)
    grid = [(label, np.concatenate([np.stack([to_uint8(x) for x in im]),
                                    np.full((width - len(im), *np.shape(im)[1:]), 255, np.uint8)]))
            for label, im in grid]  # fmt: skip
    save_png(DOCS / f"{args.name}.png", labeled_rows(grid))
    meta = {
        "steps": steps,
        "guidance": guidance,
        "owner": {TOKENS[i]: "{1} {0}".format(*OBJECTS[owner[i]]) for i in range(2)},
        "train": {k: train_report.get(k) for k in ("steps", "seconds", "compile_s", "loss_last", "trainable_params")},
        "refresh": {"tried_accepted": saved["refreshes"].astype(int).tolist() if "refreshes" in saved else None},
        "first_caption": captions[0],
        "train_log": train_log(run),
        "pair": [list(o) for o in OBJECTS],
        "vae_round_trip": ceiling,
        "run": str(run),
    }
    return {"iou": ious, "results": results, "drift": drift, "meta": meta}


def train_log(run: Path) -> dict | None:
    """{"steps", "seconds"}: the logged span of the run's training (OUT/train/metrics.jsonl; compilation and the
    first log interval excluded), or None without a log."""
    path = Path(run) / "train" / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    rows = [r for r in rows if "time" in r and "step" in r]
    if len(rows) < 2:
        return None
    return {"steps": rows[-1]["step"], "seconds": rows[-1]["time"] - rows[0]["time"], "from_step": rows[0]["step"]}


def rates(data: dict) -> dict:
    """Counts k of a result with n become {"k", "n", "ci"} (the form tools/personalization_table.py reads)."""
    from jaxdiff.erase.evaluate import wilson as interval

    def conv(d):
        if not isinstance(d, dict) or "k" in d:  # not a result, or already converted
            return d
        n = d.get("n")
        out = {}
        for k, v in d.items():
            if isinstance(v, int) and not isinstance(v, bool) and k != "n" and isinstance(n, int):
                out[k] = {"k": v, "n": n, "ci": interval(v, n)}
            else:
                out[k] = conv(v)
        return out

    return conv(data)


TITLES = {
    "heldout": "The spec's protocol: a purple cross (left) and an orange star (right)",
    "train": "Control: a red circle (left) and a blue square (right), the world's own vocabulary",
}


def section(name: str, data: dict) -> list[str]:
    m = data["meta"]
    (s1, c1, _), (s2, c2, _) = m["pair"]
    pair = next(k for k, v in PAIRS.items() if [list(o) for o in v] == m["pair"])
    steps = m["train"]["steps"]
    ceiling = m["vae_round_trip"]
    log = m.get("train_log")
    timing = f"; steps {log['from_step']}-{log['steps']} took {log['seconds']:.0f} s of wall-clock" if log else ""
    lines = [
        f"## {TITLES[pair]}" + ("" if steps == 300 else f"; {steps} steps"),
        "",
        f"Regenerate: `{data.get('command', 'python tools/attencraft_eval.py')}` (resumes `{Path(m['run']).name}` "
        "under runs/). One training render, a large "
        f"{c1} {s1} on the left and a large {c2} {s2} on the right on white, no masks; `jaxdiff personalize --config "
        f"configs/personalize/attencraft.py:shapes --images DIR --token '<a>,<b>'` ({m['train']['steps']} steps of "
        f"4 instance + 4 prior examples{timing}, "
        f"{m['train']['trainable_params']:,} trained parameters: the cross-attention K/V kernels and the two token "
        f"rows). Ceiling: the frozen VAE's round trip of the training image is read by the judge as "
        f"{ceiling['objects']} object(s): {', '.join(ceiling['read']) or 'none'}.",
        "",
        f"**Masks** (8x8, the UNet's finest attention). Token ↔ object by mask overlap: "
        f"{', '.join(f'`{k}` = {v}' for k, v in m['owner'].items())}. Renderer masks: the 8x8 cells at least half "
        "covered by the object. Mask refreshes (every 20 steps, kept at SSIM ≥ 0.8 of both concept masks): "
        f"[tried, accepted] = {m['refresh'].get('tried_accepted')}.",
        "",
        "| masks | IoU `<a>` | IoU `<b>` | IoU background |",
        "|---|---:|---:|---:|",
    ]
    for k, v in data["iou"].items():
        lines.append(f"| {k} | {v['<a>']:.2f} | {v['<b>']:.2f} | {v['background']:.2f} |")
    lines += [
        "",
        "| prompt | token's object | exactly one object, the right one | one object | right shape | right colour "
        "| cross-contamination | (other's shape/colour) | (a second object) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p, v in data["results"].items():
        if "one_correct" not in v:
            continue
        n = v["n"]
        cells = [wilson(v[k], n) for k in ("one_correct", "one_object", "shape", "colour", "contaminated")]
        cells += [wilson(v[k], n) if k in v else "n/a" for k in ("other_attribute", "second_object")]
        lines.append(f"| `{p}` | {v['object']} | " + " | ".join(cells) + " |")
    for p, v in data["results"].items():
        if "both_correct" in v:
            lines += [
                "",
                f"`{p}`: both objects right (any order) {wilson(v['both_correct'], v['n'])}; two objects "
                f"{wilson(v['two_objects'], v['n'])}.",
            ]
    dr = data["drift"]
    lines += [
        "",
        f"Drift, the world's one-object captions (e.g. `{m['first_caption']}`), same noise, shape and colour both "
        f"right: base {wilson(dr['base']['correct'], dr['base']['n'])}, after AttenCraft "
        f"{wilson(dr['attencraft']['correct'], dr['attencraft']['n'])}.",
        "",
        f"![training image, VAE round trip, renderer masks, derived masks, samples]({name}.png)",
        "",
    ]
    return lines


def report(parts: dict) -> str:
    any_part = next(iter(parts.values()), None)
    lines = ["# AttenCraft on `shapes`", ""]
    if any_part:
        m = any_part["meta"]
        lines += [
            f"Model: the embedded v2 `shapes` model; DDIM {m['steps']} steps, guidance {m['guidance']}; n = 64 "
            "images per prompt from fixed seeds; judged by the pixel judge (`jaxdiff/metrics/pixel_judge.py`); rates "
            "are k/n with 95 % Wilson intervals. Regenerate everything: `python tools/attencraft_eval.py && python "
            "tools/attencraft_eval.py --pair train && python tools/attencraft_eval.py --pair train --train-steps "
            "1500` (3-7 min each on 2 shared CPU cores: about a minute of compilation, 20 s (300 steps) to 110 s "
            "(1500) of training, the rest sampling and judging).",
            "",
            "Columns: *exactly one object, the right one*: the judge finds one object with the token's shape and "
            "colour; *cross-contamination*: the image shows the other concept: an object with its shape or colour, "
            "or a second object.",
            "",
        ]
    for name, part in parts.items():
        lines += section(name, part)
    lines += [READING, NOTES]
    return "\n".join(lines) + "\n"


READING = """## Reading (measured 2026-12-01; the tables above give n and intervals)

- **The masks are the part that works.** With the x split (below) the derived 8x8 masks of the held-out pair match
  the renderer's object cells (IoU 1.00 / 0.75 initially, background 0.98). On the control pair the circle's mask is
  good (0.83) but the square's is 2 cells (IoU 0.15): the start token's map wins most of the square. The SSIM gate
  refuses almost every refresh (1 of 14, 0 of 14, 0 of 74 accepted): at 8x8 with a 7x7 window a few flipped cells
  drop SSIM below 0.8, and each refresh's single noisy forward pass (t < 300) flips some.
- **One-token prompts do not give one object.** "a `<a>`" and "a `<b>`" draw both objects of the training image in
  89-100 % of the images, in both pairs; exactly one right object: 0/64 everywhere. The two-token prompt does
  reproduce the control pair (97 % at 300 steps) and the model's own captions move little (drift 97 % -> 97 %
  control, 97 % -> 91 % held-out), so the tokens learned the image jointly, not separately: the entanglement AttenCraft
  targets is not removed at this scale. Training 5x longer (1500 steps) changes nothing for the one-token prompts
  and halves the two-token accuracy (47 %).
- **The held-out pair is beyond this pipeline's ceiling anyway**: the frozen VAE's round trip of the training image
  is read as a green cross and an orange circle (purple and the star do not survive the 4x autoencoder; see
  docs/personalization.md and docs/anchor_dreambooth.md), so "the right object" is 0 by construction there; the
  control pair separates that from the method.
- Likely reasons (not tested further): outside the present tokens' masks a one-token prompt gets no loss at all, so
  nothing teaches "a `<a>`" to leave the other half empty, while the trained K/V projections are shared by every
  prompt; the 8x8 masks cover only the objects' cores; and the fresh tokens' attention never separates by itself
  (the official segmentation finds no concept classes, below). Whether the method separates concepts at SD scale
  is not tested here.
"""


NOTES = """## Notes

- **The official segmentation finds no concept classes on this model.** At initialisation the two fresh tokens'
  8x8 cross-attention maps agree to about 0.01 after normalisation: both light up both objects, whatever the init
  words tried ("shape", "object", "square"/"triangle", "purple"/"orange") and with or without "on the left / on the
  right" in the prompt. So no pixel beats the other concept map by 0.1 and the official code aborts ("tokens must be
  distinct"; tests/test_attencraft.py checks this). At 4x4 the distinctness test can pass, but the classes are
  scattered cells, not the objects. The background-vs-objects split, on the other hand, is clean. The `:shapes`
  preset therefore sets `split = "x_kmeans"` (not in the paper): the joint concept region is split in two by 2-means
  of x, left to `<a>`. The figures above measure AttenCraft with that fallback; `split = "none"` reproduces the
  official abort.
- Every other piece is the official one: masks from one noisy forward pass (t < 300), A⁴ affinity, threshold 0.1,
  1/3 prompt subsets, masked ε-MSE + prior + JS attention loss, refresh every 20 steps kept only at SSIM ≥ 0.8
  (window 7 on an 8x8 mask keeps a 2x2 centre: SSIM of 8x8 binary masks is coarse).
- UNVERIFIED readings are listed in `jaxdiff/personalize/attencraft.py`'s docstring.
"""


def main(argv=None) -> int:
    global OBJECTS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--pair",
        choices=sorted(PAIRS),
        default="heldout",
        help="heldout: the spec's purple cross + "
        "orange star (docs/attencraft.json); train: a red circle + blue square (docs/attencraft_train.json)",
    )
    p.add_argument("--run", default=None, help="the personalize output folder (default runs/attencraft[_train])")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--n", type=int, default=64, help="samples per one-token / two-token prompt")
    p.add_argument("--n-drift", type=int, default=64, help="world captions for the drift check")
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", action="store_true", help="only rewrite docs/attencraft.md from the JSON files")
    args = p.parse_args(argv)
    from jaxdiff.fileio import atomic_write_text

    OBJECTS = PAIRS[args.pair]
    args.name = ("attencraft" if args.pair == "heldout" else f"attencraft_{args.pair}") + (
        "" if args.train_steps == 300 else f"_{args.train_steps}"
    )
    args.run = args.run or str(ROOT / "runs" / args.name)
    if not args.report:
        train_report = train(args)
        data = rates(measure(args, train_report))
        from personalization_table import stamp

        data.update(stamp("attencraft"))
        data["command"] = "python tools/attencraft_eval.py" + "".join(
            f" --{k} {v}"
            for k, v in (("pair", args.pair), ("n", args.n), ("train-steps", args.train_steps))
            if v != {"pair": "heldout", "n": 64, "train-steps": 300}[k]
        )
        atomic_write_text(DOCS / f"{args.name}.json", json.dumps(data, indent=2) + "\n")
    parts = {}
    for f in sorted(DOCS.glob("attencraft*.json"), key=lambda f: (len(f.stem), f.stem)):
        part = rates(json.loads(f.read_text()))
        if "train_log" not in part["meta"] and (log := train_log(Path(part["meta"]["run"]))):
            part["meta"]["train_log"] = log  # results written before the key existed
            atomic_write_text(f, json.dumps(part, indent=2) + "\n")
        parts[f.stem] = part
    text = report(parts)
    atomic_write_text(DOCS / "attencraft.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
