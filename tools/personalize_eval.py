"""Measure Textual Inversion and DreamBooth-LoRA on the shapes world's held-out star; writes docs/personalization.md.

    python tools/personalize_eval.py --train          # render 8 stars, run both `jaxdiff personalize` commands, measure
    python tools/personalize_eval.py                  # measure existing runs (RUNS/<method>/model)

Concept fidelity: samples of prompts naming the token as the shape ("a red <v>"; the held-out templates, e.g. "<v> in
blue against a grey backdrop") judged by the pixel judge: valid, a star, of the asked colour. Reference: the
unpersonalised model given the word "star" (never trained), and the VAE's round trip of real star renders (the
ceiling: the frozen VAE must be able to draw a star). Preservation: the world's plain captions ("a red circle on the
left") before and after, same seeds, shape and colour by the probe and by the pixel judge. Rates with n and 95 %
Wilson intervals.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxdiff.data import shapes as S  # noqa: E402
from jaxdiff.erase import evaluate as ev  # noqa: E402

METHODS = ("textual_inversion", "dreambooth_lora")
TOKEN = "<v>"
SHAPE = "star"


def train(runs: Path) -> None:
    from jaxdiff.personalize.data import write_shapes_renders

    images = runs / "star_images"
    if not images.is_dir():
        write_shapes_renders(images, 8, TOKEN, SHAPE, seed=0, sizes=("large",))
    for m in METHODS:
        cmd = [sys.executable, "-m", "jaxdiff", "personalize", "--config", f"configs/personalize/{m}.py:shapes"]
        cmd += ["--images", str(images), "--token", TOKEN, "--out", str(runs / m), "--no-progress"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)


def concept_prompts(n: int, seed: int, split: str) -> tuple[list[str], list[str]]:
    """n prompts naming the token as the shape (train template "a {colour} {shape}" or the held-out templates), with
    the asked colours (training colours, cycled)."""
    rng = np.random.default_rng([seed, 5])
    prompts, colours = [], []
    for i in range(n):
        colour = S.COLOURS[i % len(S.COLOURS)]
        if split == "simple":
            prompts.append(f"a {colour} {TOKEN}")
        else:
            t = S.HELDOUT_TEMPLATES[1][i % len(S.HELDOUT_TEMPLATES[1])]
            pos = str(rng.choice(S.POSITIONS))
            fields = dict(shape=TOKEN, colour=colour, size="large", position=S.TRAIN_PHRASES[pos][0])
            prompts.append(t.format(bg=str(rng.choice(S.BACKGROUNDS)), **fields))
        colours.append(colour)
    return prompts, colours


def fidelity(images: np.ndarray, colours: list[str]) -> dict:
    from jaxdiff.metrics import pixel_judge

    v = pixel_judge.judge(images, expected_objects=1)
    star = v["valid"] & (v["shape"][:, 0] == S.ALL_SHAPES.index(SHAPE))
    asked = np.asarray([S.ALL_COLOURS.index(c) for c in colours])
    return {
        "fidelity": ev.rate(star & (v["colour"][:, 0] == asked)),
        "star": ev.rate(star),
        "valid": ev.rate(v["valid"]),
    }


def preservation(probe, images: np.ndarray, scenes) -> dict:
    from jaxdiff.metrics import pixel_judge

    preds, _ = probe(images)
    v = pixel_judge.judge(images, expected_objects=1, shapes=S.SHAPES, colours=S.COLOURS)
    shape = np.asarray([S.SHAPES.index(s.objects[0].shape) for s in scenes])
    colour = np.asarray([S.COLOURS.index(s.objects[0].colour) for s in scenes])
    probe_ok = (preds["shape0"] == shape) & (preds["colour0"] == colour)
    pixel_ok = v["valid"] & (v["shape"][:, 0] == shape) & (v["colour"][:, 0] == colour)
    return {"probe": ev.rate(probe_ok), "pixel": ev.rate(pixel_ok), "both": ev.rate(probe_ok & pixel_ok)}


def vae_ceiling(pipe, n: int, seed: int) -> dict:
    """The pixel judge on the VAE's reconstructions of n large star renders in the asked colours."""
    import jax.numpy as jnp

    rng = np.random.default_rng([seed, 9])
    renders, colours = [], []
    for i in range(n):
        scene = S.sample_scene(rng, num_objects=1, shapes=(SHAPE,))
        obj = dataclasses.replace(scene.objects[0], size="large", colour=S.COLOURS[i % len(S.COLOURS)])
        renders.append(S.render(dataclasses.replace(scene, objects=(obj,))))
        colours.append(obj.colour)
    x = jnp.asarray(np.stack(renders), jnp.float32) / 255.0
    z = pipe.vae.encode(pipe.vae.params, x * 2 - 1)[0]
    rec = np.clip(np.asarray(pipe.vae.decode(pipe.vae.params, z)) / 2 + 0.5, 0, 1)
    return {"reconstruction": fidelity(rec, colours), "renders": fidelity(np.stack(renders), colours)}


def r(x: dict) -> str:
    lo, hi = x["ci"]
    return f"{100 * x['rate']:.0f}% ({100 * lo:.0f}–{100 * hi:.0f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/personalize_eval", help="folder of the two runs (and the star renders)")
    p.add_argument("--train", action="store_true", help="first render the stars and run both commands (resumable)")
    p.add_argument("--n", type=int, default=64, help="samples per prompt set and model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc", default="docs/personalization.md")
    p.add_argument("--png", default="docs/personalization.png")
    p.add_argument("--extra", action="append", default=[], help="NAME: another run RUNS/NAME measured as a variant")
    args = p.parse_args(argv)
    runs = ROOT / args.runs
    if args.train:
        train(runs)

    from jaxdiff.erase.job import probe as load_probe
    from jaxdiff.images import labeled_rows, save_png
    from jaxdiff.sampling.pipeline import load_pipeline

    t0 = time.perf_counter()
    probe = load_probe()
    base = load_pipeline("shapes")
    names = list(METHODS) + list(args.extra)
    pipes = {"unpersonalised": base} | {m: load_pipeline(runs / m / "model") for m in names}
    latent = (int(base.unet.config["sample_size"]),) * 2 + (int(base.unet.config["in_channels"]),)
    guidance = 5.0
    results: dict = {"n": args.n, "guidance": guidance, "steps": 25, "fidelity": {}, "preservation": {}}
    grid = [("instance\nimages", np.stack([np.asarray(im) for im in _instances(runs)]))]
    plain, scenes = ev.captions(None, args.n, args.seed + 3)
    results["plain_example"] = plain[0]
    for name, pipe in pipes.items():
        results["fidelity"][name] = {}
        for i, split in enumerate(("simple", "heldout")):
            prompts, colours = concept_prompts(args.n, args.seed, split)
            if name == "unpersonalised":
                prompts = [q.replace(TOKEN, SHAPE) for q in prompts]
            z = ev.noise(args.n, latent, args.seed + 10 * i)
            images = pipe(prompts, latents=z, steps=25, guidance=guidance)
            results["fidelity"][name][split] = fidelity(images, colours) | {"example": prompts[1]}
            grid.append((f"{name}\n{prompts[1]}"[:60], images[1::4][:8]))
        images = pipe(plain, latents=ev.noise(args.n, latent, args.seed + 77), steps=25, guidance=guidance)
        results["preservation"][name] = preservation(probe, images, scenes)
        if name in ("unpersonalised", "dreambooth_lora"):
            grid.append((f"{name}\nworld captions", images[:8]))
    results["vae"] = vae_ceiling(base, args.n, args.seed)
    results["runs"] = {m: json.loads((runs / m / "report.json").read_text()) for m in names}
    results["extra_configs"] = {m: _overrides(runs / m) for m in args.extra}
    results["eval_seconds"] = time.perf_counter() - t0
    from personalization_table import stamp  # source hashes: the table's current/stale column

    results.update(stamp("personalize"))
    save_png(ROOT / args.png, labeled_rows(grid, label_width=230))
    (runs / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    (ROOT / args.doc).write_text(markdown(results, args))
    print(f"wrote {args.doc}, {args.png} and {runs / 'eval.json'}")
    return 0


def _overrides(run: Path, label: str = "{}:shapes") -> str:
    """How a variant's config differs from its method's :shapes preset (for the doc), after `label` (the method)."""
    from jaxdiff.config import load_config

    saved = json.loads((run / "config.json").read_text())
    preset = json.loads(load_config(f"configs/personalize/{saved['method']}.py:shapes").to_json_best_effort())

    def flat(d, pre=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{pre}{k}.") if isinstance(v, dict) else {f"{pre}{k}": v})
        return out

    a, b = flat(preset), flat(saved)
    diff = [f"--config.{k}={b[k]}" for k in sorted(b) if k not in ("images", "token") and a.get(k) != b[k]]
    return label.format(saved["method"]) + " " + " ".join(diff)


def _instances(runs: Path):
    from PIL import Image

    return [np.asarray(Image.open(f).convert("RGB")) for f in sorted((runs / "star_images").glob("*.png"))]


def markdown(res: dict, args) -> str:
    n = res["n"]
    f, p = res["fidelity"], res["preservation"]
    lines = [
        "# Personalization on the shapes world: teaching a held-out star",
        "",
        "Regenerate: `python tools/personalize_eval.py --train` (renders the 8 stars, runs both commands, measures; "
        "without `--train` it measures existing runs). "
        f"Sampling: DDIM {res['steps']} steps, CFG {res['guidance']}, n = {n} images per row and model (fixed seeds, "
        "the same for every model); 95 % Wilson intervals in brackets.",
        "",
        "The base model never saw a star (`star` is a held-out shape of `jaxdiff/data/shapes.py`). Each method learns "
        f"the new token `{TOKEN}` from 8 renders of large stars (varied colour, position, background; each with a "
        "caption file such as `a large red <v> on the right on a black background`):",
        "",
        "```",
        *[
            f"jaxdiff personalize --config configs/personalize/{m}.py:shapes --images {args.runs}/star_images "
            f'--token "{TOKEN}" --out {args.runs}/{m}'
            for m in METHODS
        ],
        "```",
        "",
        "| method | trained params | steps | wall-clock (s, shared 2-core CPU) |",
        "|---|---:|---:|---:|",
    ]
    for m, rep in res["runs"].items():
        lines.append(f"| {m} | {rep['trainable_params']:,} | {rep['steps']} | {rep['seconds']:.0f} |")
    for m, how in res.get("extra_configs", {}).items():
        lines += ["", f"Variant `{m}`: `{how}`."]
    lines += [
        "",
        "## Concept fidelity",
        "",
        "The pixel judge (non-learned; it knows the held-out shapes, the probe does not) finds one valid object that "
        "is a star of the asked colour. *simple*: `a {colour} <v>`; *held-out templates*: the world's held-out "
        "templates (`an image showing a <v> that is red`, `<v> in blue against a grey backdrop`, ...). The "
        "unpersonalised model gets the word `star` in place of the token.",
        "",
        "| model | prompts | fidelity (star, asked colour) | star, any colour | valid image |",
        "|---|---|---:|---:|---:|",
    ]
    for name, sets in f.items():
        for split, x in sets.items():
            label = "simple" if split == "simple" else "held-out templates"
            lines.append(f"| {name} | {label} | {r(x['fidelity'])} | {r(x['star'])} | {r(x['valid'])} |")
    v = res["vae"]
    lines += [
        "",
        f"Ceiling: the frozen VAE's round trip of {n} large star renders is judged a star of the right colour in "
        f"{r(v['reconstruction']['fidelity'])} (the renders themselves: {r(v['renders']['fidelity'])}); small stars "
        "come back as circles (2 of 8 mixed-size star renders survived the round trip as stars), so the instance "
        "images are large stars.",
        "",
        "## Preservation of the base model's own prompts",
        "",
        f"{n} world captions (train templates, e.g. `{res['plain_example']}`), same seeds before and after; "
        "shape and colour both right by the probe, by the pixel judge (an invalid image is wrong), and by "
        "both at once.",
        "",
        "| model | probe | pixel judge | both |",
        "|---|---:|---:|---:|",
    ]
    for name, x in p.items():
        lines.append(f"| {name} | {r(x['probe'])} | {r(x['pixel'])} | {r(x['both'])} |")
    lines += ["", "![samples](personalization.png)", "", _findings(res), ""]
    return "\n".join(lines)


def _findings(res: dict) -> str:
    f, p = res["fidelity"], res["preservation"]
    trained = [m for m in f if m != "unpersonalised"]
    best = max(trained, key=lambda m: f[m]["heldout"]["fidelity"]["rate"])
    base_both = p["unpersonalised"]["both"]
    drops = ", ".join(f"{m} {r(p[m]['both'])}" for m in trained if m != "textual_inversion")
    return (
        "## Findings\n\n"
        f"- Concept fidelity on held-out templates: best {best}, {r(f[best]['heldout']['fidelity'])} "
        f"(n = {res['n']}); the unpersonalised model given the word: {r(f['unpersonalised']['heldout']['fidelity'])}. "
        f"The frozen VAE's ceiling is {r(res['vae']['reconstruction']['fidelity'])}.\n"
        "- Textual Inversion (one 128-d row, frozen UNet) can only find a prompt for what the frozen UNet already "
        "draws, and the shapes UNet has never drawn a star (see the grid for what it draws instead). Preservation "
        "is exact by construction (the other rows and the UNet are the same bits): the plain prompts' samples are "
        "identical.\n"
        "- DreamBooth-LoRA moves the UNet's attention; the plain prompts go from "
        f"{r(base_both)} to {drops} (both judges), with the prior-preservation term on world captions.\n"
        + (
            "- So in this world neither method teaches a genuinely new shape within these CPU budgets; what is "
            "reproduced is the machinery (token rows, LoRA, prior batch, runner, measurement), not the papers' "
            "subject fidelity."
            if f[best]["heldout"]["fidelity"]["rate"] < 0.05
            else ""
        )
    )


if __name__ == "__main__":
    sys.exit(main())
