"""Anchor-start DreamBooth on the shapes world: layout kept vs identity of `<v>` over the img2img strength s.

    python tools/anchor_eval.py --train --method dreambooth   # render the instances, run full DreamBooth, measure
    python tools/anchor_eval.py --method dreambooth_lora      # measure an existing run (RUNS/METHOD/model)

`<v>` is a yellow triangle: a specific subject of a class the model knows (DreamBooth's setting: "a sks dog"),
learned from 8 renders of large yellow triangles captioned "a large <v> on the right on a white background" by a
run (full DreamBooth or DreamBooth-LoRA, :shapes preset, --steps, --override). Not a held-out concept: the held-out
star stays at 0-11 % fidelity after DreamBooth-LoRA (docs/personalization.md), and the held-out colour purple cannot
be drawn at all: the frozen VAE decodes purple renders as green (all 8 instance images; see docs/anchor_dreambooth.md).
Anchors: two-object renders of the training world whose left object is a generic red, green or blue circle or square;
prompt "a <v> on the left and a {colour} {shape} on the right" (the anchor's right object). For
each s in --strengths (1.0 = no anchor, plain text-to-image from the same noise) the personalised model samples from
the anchor at s, and the pixel judge scores
  layout kept: two objects, left and right, each of the anchor's size;
  identity:    two objects and the left one is a yellow triangle (the concept judged right);
  right kept:  the right object has the anchor's shape and colour.
Rates over n anchors per s with 95 % Wilson intervals; writes RUNS/eval_METHOD.json, --png, and --doc from every
RUNS/eval_*.json present (one table per method).
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

from personalize_eval import _overrides, r  # noqa: E402  (tools/ is on sys.path: the script's folder)

from jaxdiff.data import shapes as S  # noqa: E402
from jaxdiff.erase import evaluate as ev  # noqa: E402
from jaxdiff.personalize import anchor  # noqa: E402

TOKEN, SHAPE, COLOUR = "<v>", "triangle", "yellow"
METHODS = ("dreambooth_lora", "dreambooth")


def write_instances(folder: Path, n: int = 8, seed: int = 0) -> None:
    """n renders of a large yellow triangle (varied position and background) with captions naming the token."""
    from jaxdiff.images import save_png

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 61])
    for i in range(n):
        scene = S.sample_scene(rng, num_objects=1, shapes=(SHAPE,))
        obj = dataclasses.replace(scene.objects[0], colour=COLOUR, size="large")
        scene = dataclasses.replace(scene, objects=(obj,))
        save_png(folder / f"{i:03d}.png", S.render(scene, 32))
        where = S.TRAIN_PHRASES[obj.position][0]
        (folder / f"{i:03d}.txt").write_text(f"a large {TOKEN} {where} on a {scene.background} background\n")


def train(runs: Path, method: str, steps: int, overrides: list[str]) -> list[str]:
    images = runs / "instance_images"
    if not images.is_dir():
        write_instances(images)
    cmd = [sys.executable, "-m", "jaxdiff", "personalize", "--config", f"configs/personalize/{method}.py:shapes"]
    cmd += ["--images", str(images), "--token", TOKEN, "--out", str(runs / method), "--no-progress"]
    cmd += [f"--config.train.steps={steps}", "--config.sample.num_images=4", *overrides]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return cmd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/anchor_dreambooth", help="folder of the run and its instance images")
    p.add_argument("--train", action="store_true", help="first render the instances and run the method")
    p.add_argument("--method", default="dreambooth", choices=METHODS, help="full DreamBooth or DreamBooth-LoRA")
    p.add_argument("--override", action="append", default=[], help="--config.KEY=VALUE for --train (repeatable)")
    p.add_argument("--steps", type=int, default=400, help="training steps of --train (the short budget)")
    p.add_argument("--n", type=int, default=32, help="anchors (samples) per strength")
    p.add_argument("--strengths", default="0.3,0.5,0.7,1.0", help="comma-separated img2img strengths")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc", default="docs/anchor_dreambooth.md")
    p.add_argument("--png", default="docs/anchor_dreambooth_{method}.png", help="{method} and {runs} are filled in")
    p.add_argument("--doc-runs", action="append", default=[], help="another RUNS folder whose evals the doc also lists")
    args = p.parse_args(argv)
    args.png = args.png.format(method=args.method, runs=Path(args.runs).name)
    runs = ROOT / args.runs
    strengths = [float(s) for s in args.strengths.split(",") if s.strip()]
    if args.train:
        train(runs, args.method, args.steps, args.override)

    from jaxdiff.images import labeled_rows, save_png
    from jaxdiff.metrics import pixel_judge
    from jaxdiff.sampling.pipeline import load_pipeline

    t0 = time.perf_counter()
    personal = load_pipeline(runs / args.method / "model")
    base = load_pipeline("shapes")
    latent = (int(base.unet.config["sample_size"]),) * 2 + (int(base.unet.config["in_channels"]),)
    scenes = anchor.anchor_scenes(args.n, args.seed)
    anchors = np.stack([S.render(s, 32) for s in scenes])
    prompts = anchor.composition_prompts(scenes, TOKEN)
    z = ev.noise(args.n, latent, args.seed + 7)
    show = slice(0, 8)
    grid = [("anchors", anchors[show])]

    def score(images) -> dict:
        v = pixel_judge.judge(images, expected_objects=2)
        lay, ident = anchor.layout_kept(v, scenes), anchor.identity_left(v, SHAPE, COLOUR)
        right = anchor.right_kept(v, scenes)
        return {
            "layout": ev.rate(lay),
            "identity": ev.rate(ident),
            "both": ev.rate(lay & ident),
            "right": ev.rate(right),
            "two_objects": ev.rate(v["num_objects"] == 2),
        }

    results: dict = {"n": args.n, "guidance": args.guidance, "steps": args.sample_steps, "prompt": prompts[0]}
    results["anchor_renders"] = score(anchors)
    results["strengths"] = {}
    for s in strengths:
        t = time.perf_counter()
        images = anchor.sample_from_anchor(
            personal, prompts, anchors, s, noise=z, steps=args.sample_steps, guidance=args.guidance
        )
        results["strengths"][str(s)] = score(images)
        grid.append((f"<v> model\ns = {s}", images[show]))
        x = results["strengths"][str(s)]
        print(f"s={s}: layout {r(x['layout'])}, identity {r(x['identity'])} ({time.perf_counter() - t:.0f} s)")
    # reference: the unpersonalised model asked for the words (a yellow triangle), plain text-to-image
    words = [q.replace(TOKEN, f"{COLOUR} {SHAPE}") for q in prompts]
    images = anchor.sample_from_anchor(
        base, words, anchors, 1.0, noise=z, steps=args.sample_steps, guidance=args.guidance
    )
    results["base_words"] = score(images)
    grid.append(("base model,\n'yellow triangle', s = 1", images[show]))
    print(f"base, words: identity {r(results['base_words']['identity'])}")
    extra = "".join(f" --override={o}" for o in args.override)
    if args.strengths != p.get_default("strengths"):
        extra += f" --strengths {args.strengths}"
    if args.runs != p.get_default("runs"):
        extra += f" --runs {args.runs} --png {args.png}"
    results["command"] = f"python tools/anchor_eval.py --train --method {args.method} --steps {args.steps} --n {args.n}"
    results["command"] += extra
    results["config"] = _overrides(runs / args.method, "{}.py:shapes")
    results["png"] = args.png
    results["run"] = json.loads((runs / args.method / "report.json").read_text())
    results["eval_seconds"] = time.perf_counter() - t0
    from personalization_table import stamp  # source hashes: the table's current/stale column

    results.update(stamp("anchor_lora" if args.method == "dreambooth_lora" else "anchor_full"))
    save_png(ROOT / args.png, labeled_rows(grid, label_width=200))
    (runs / f"eval_{args.method}.json").write_text(json.dumps(results, indent=2) + "\n")
    (ROOT / args.doc).write_text(markdown(runs, *[ROOT / x for x in args.doc_runs]))
    print(f"wrote {args.doc}, {args.png} and {runs / f'eval_{args.method}.json'}")
    return 0


def markdown(*folders: Path) -> str:
    """The doc from every FOLDER/eval_<method>.json present (one table per run)."""
    evals = {
        f"{m} ({folder.name})": json.loads((folder / f"eval_{m}.json").read_text())
        for folder in folders
        for m in METHODS
        if (folder / f"eval_{m}.json").is_file()
    }
    first = next(iter(evals.values()))
    lines = [
        "# Anchor-start DreamBooth on the shapes world: layout kept vs identity",
        "",
        "The recipe of §6/§9 of the personalization spec (deepfake interaction images): a DreamBooth model of a "
        "subject `<v>` samples a two-subject composition starting from an anchor image at img2img strength s "
        "(`jaxdiff.personalize.anchor.sample_from_anchor`, SDEdit through the pipeline's `image=`/`strength=`), "
        "so the layout comes from the anchor and the identity from the fine-tuned model.",
        "",
        "Regenerate (each line trains, resumably, then measures; without `--train` it measures an existing run):",
        "",
        "```",
        *[e["command"] for e in evals.values()],
        "```",
        "",
        f"Sampling: DDIM {first['steps']} steps, CFG {first['guidance']}, n = {first['n']} anchors per s (the same "
        "anchors, prompts and noise at every s and for every model); 95 % Wilson intervals in brackets.",
        "",
        "`<v>` = a **yellow triangle**: a specific subject of a class the model knows, DreamBooth's own setting "
        '("a sks dog"). Each run learns it from the same 8 renders of large yellow triangles captioned e.g. '
        "`a large <v> on the right on a white background`. Why not a held-out concept: the held-out star of "
        "`docs/personalization.md` stays at 0–11 % fidelity after DreamBooth-LoRA, and the held-out colour purple "
        "cannot be drawn at all by this pipeline: the frozen VAE decodes the 8 purple-square instance renders as "
        "green (pixel judge: 8/8 green), so a first purple-square run (DreamBooth-LoRA and full DreamBooth, 400 "
        "steps) had 0/32 identity at every s (runs/anchor_eval, not in this table).",
        "",
        "Anchors: two-object renders of the training world; the left object is a generic red, green or blue circle "
        "or square (the subject `<v>` should replace), the right object anything. Prompt: "
        f"`{first['prompt']}` (the anchor's right object). Pixel judge (expecting two objects):",
        "",
        "- **layout kept**: two objects found, left and right, each of the anchor's size;",
        "- **identity**: two objects and the left one is a yellow triangle (the concept judged right);",
        "- **right kept**: the right object has the anchor's shape and colour.",
        "",
    ]
    for method, res in evals.items():
        run = res["run"]
        lines += [
            f"## {method}: {run['steps']} steps, {run['trainable_params']:,} trained parameters, "
            f"{run['seconds']:.0f} s on the shared 2-core CPU",
            "",
            f"Config: `{res['config']}`.",
            "",
            "| s | layout kept | identity of `<v>` | both | right kept | two objects |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        rows = [("anchor renders themselves", res["anchor_renders"])]
        rows += [(f"{s} (no anchor)" if float(s) >= 1 else s, x) for s, x in res["strengths"].items()]
        rows += [("base model, words `yellow triangle`, no anchor", res["base_words"])]
        for label, x in rows:
            lines.append(
                f"| {label} | {r(x['layout'])} | {r(x['identity'])} | {r(x['both'])} | {r(x['right'])} "
                f"| {r(x['two_objects'])} |"
            )
        png = Path(res.get("png", f"anchor_dreambooth_{res['run']['method']}.png")).name
        lines += ["", f"![anchors, then samples per s (first 8 anchors)]({png})", ""]
    lines += _findings(evals)
    return "\n".join(lines)


def _findings(evals: dict) -> list[str]:
    out = ["## What is reproduced, what is not", ""]
    for method, res in evals.items():
        curve = ", ".join(
            f"s = {s}: layout {100 * x['layout']['rate']:.0f} % / identity {100 * x['identity']['rate']:.0f} %"
            for s, x in res["strengths"].items()
        )
        out.append(f"- {method} ({res['run']['steps']} steps): {curve} (n = {res['n']} each).")
    best = max(x["identity"]["rate"] for res in evals.values() for x in res["strengths"].values())
    words = next(iter(evals.values()))["base_words"]["identity"]
    out += [
        "- Reproduced: the machinery (full DreamBooth with prior preservation through `jaxdiff personalize`, "
        "anchor-start sampling through the pipeline's img2img path, a judged layout/identity measurement over s "
        "with intervals) and the layout side of the curve: the anchor's layout is kept most at low s and falls "
        "towards the no-anchor rate as s grows.",
        (
            f"- Not reproduced: the identity side. The best identity at any s is {100 * best:.0f} %: at this budget "
            "the token is not bound to the subject (the grids show the anchors' own colours and shapes), although "
            f"the base model asked for the words `yellow triangle` draws it in {r(words)}. So the trade-off the spec "
            "asks for (identity rising with s while layout falls) has only its layout half here; a longer or "
            "stronger run is the open item."
            if best < 0.1
            else f"- Identity: the best run reaches {100 * best:.0f} % identity at some s (the base model asked for "
            f"the words: {r(words)}); the runs that bind the token trade layout for identity over s as listed above, "
            "those that do not keep 0 % identity at every s."
        ),
        "- Not reproduced either: photographs, faces or any identity metric of the papers (face recognition, "
        "DINO/CLIP similarity); the subject here is one of the world's own object classes in a known colour, "
        "judged by the pixel judge; a held-out subject (star, purple) gives no identity signal on this model (see "
        "above). One training run per method (no seeds over training); the anchors are renders, not the base "
        "model's own two-object samples.",
        "",
    ]
    return out


if __name__ == "__main__":
    sys.exit(main())
