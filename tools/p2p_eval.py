#!/usr/bin/env python
"""Prompt-to-prompt on `shapes`: swap one word (a colour, or a shape) in "a {colour} {shape} on the {side}" and
sample the source and the edited prompt from the same noise, with and without `PromptToPrompt`; the probe reads
every image. A good edit changes the swapped attribute and keeps the rest of the source image (the other attribute,
the side) and its pixels outside the object.

  python tools/p2p_eval.py                          # N=48 per swap kind, docs/p2p_shapes.md + .png
  python tools/p2p_eval.py --n 16 --out /tmp/p2p    # quick

Reports, per swap kind (colour, shape), with 95 % Wilson intervals: the target attribute right (edit success), the
kept attribute and side equal to the source image's (preservation), and the mean absolute pixel change from the
source image (mean ± 1.96 SE over the pairs); for plain sampling of the edited prompt and for prompt-to-prompt; and
prompt-to-prompt's pixel change relative to plain sampling's, paired by prompt pair and noise (95 % interval of the
mean paired difference, mean ± 1.96 SE, divided by plain's mean).
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


def wilson(k: int, n: int, z: float = 1.96) -> str:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{p:.1%} [{max(0, centre - half):.0%}, {min(1, centre + half):.0%}]"


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of the mean."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def pairs(n: int, kind: str, seed: int):
    """n (source prompt, target prompt, source labels, target labels) with one word swapped."""
    from jaxdiff.data import shapes as S

    rng = np.random.default_rng([seed, 0 if kind == "colour" else 1])
    out = []
    for _ in range(n):
        shape, colour = rng.choice(S.SHAPES), rng.choice(S.COLOURS)
        side = rng.choice(("left", "right"))
        if kind == "colour":
            new = rng.choice([c for c in S.COLOURS if c != colour])
            src, tgt = (colour, shape), (new, shape)
        else:
            new = rng.choice([s for s in S.SHAPES if s != shape])
            src, tgt = (colour, shape), (colour, new)
        out.append((f"a {src[0]} {src[1]} on the {side}", f"a {tgt[0]} {tgt[1]} on the {side}", src, tgt, side))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--n", type=int, default=48, help="prompt pairs per swap kind")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cross-replace", type=float, default=0.8)
    p.add_argument("--self-replace", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/p2p_shapes")
    args = p.parse_args(argv)

    from jaxdiff.data import shapes as S
    from jaxdiff.fileio import atomic_write_text
    from jaxdiff.images import labeled_rows, save_png
    from jaxdiff.metrics.probe import load_probe
    from jaxdiff.sampling.pipeline import load_pipeline
    from jaxdiff.sampling.prompt_to_prompt import PromptToPrompt

    t0 = time.time()
    pipe, probe = load_pipeline(args.model), load_probe()
    defaults = json.loads((pipe.path / "sampling_defaults.json").read_text()) if args.model == "shapes" else {}
    guidance = float(defaults.get("guidance", 7.5))
    edit = PromptToPrompt(2, cross_replace=args.cross_replace, self_replace=args.self_replace)
    size = pipe.default_size // pipe.vae_scale_factor
    results, grid = {}, []
    for kind in ("colour", "shape"):
        rows = {"plain": [], "p2p": []}
        for i, (src, tgt, _, tgt_lab, _) in enumerate(pairs(args.n, kind, args.seed)):
            noise = np.random.default_rng([args.seed, i, 7]).standard_normal((1, size, size, 4)).astype(np.float32)
            noise = noise.repeat(2, axis=0)
            plain = pipe([src, tgt], steps=args.steps, guidance=guidance, latents=noise)
            edited = pipe([src, tgt], steps=args.steps, guidance=guidance, latents=noise, attention_edit=edit)
            for name, images in (("plain", plain), ("p2p", edited)):
                preds, _ = probe(images)
                read = lambda j: (  # noqa: E731
                    S.COLOURS[preds["colour0"][j]] if preds["colour0"][j] < len(S.COLOURS) else None,
                    S.SHAPES[preds["shape0"][j]] if preds["shape0"][j] < len(S.SHAPES) else None,
                    S.POSITIONS[preds["position0"][j]],
                )
                source, target = read(0), read(1)
                changed = 0 if kind == "colour" else 1
                kept = 1 - changed
                rows[name].append(
                    {
                        "edit_right": target[changed] == tgt_lab[changed],
                        "kept_as_source": target[kept] == source[kept] and target[2] == source[2],
                        "pixel_change": float(np.abs(images[1] - images[0]).mean()),
                    }
                )
            if i < 4:
                grid.append((f"{src} -> {tgt}", np.stack([plain[0], plain[1], edited[1]])))
        results[kind] = {
            name: {
                "edit_right": sum(r["edit_right"] for r in v),
                "kept_as_source": sum(r["kept_as_source"] for r in v),
                "pixel_change": float(np.mean([r["pixel_change"] for r in v])),
                "pixel_change_values": [r["pixel_change"] for r in v],
                "n": len(v),
            }
            for name, v in rows.items()
        }
        print(kind, json.dumps(results[kind]), flush=True)
    seconds = time.time() - t0
    paired = {}  # prompt-to-prompt's pixel change minus plain sampling's, pair by pair (same prompts, same noise)
    for kind, r in results.items():
        diff = np.subtract(r["p2p"]["pixel_change_values"], r["plain"]["pixel_change_values"])
        mean, se = mean_se(diff)
        base = r["plain"]["pixel_change"]
        paired[kind] = {
            "mean_difference": mean,
            "ci95": [mean - 1.96 * se, mean + 1.96 * se],
            "relative": mean / base,
            "relative_ci95": [(mean - 1.96 * se) / base, (mean + 1.96 * se) / base],
            "n": len(diff),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python tools/p2p_eval.py" + (f" --n {args.n}" if args.n != 48 else "")
    lines = [
        "# Prompt-to-prompt on `shapes`",
        "",
        f"Regenerate: `{command}`. Model `{args.model}`, {args.steps} DDIM steps, guidance {guidance}; "
        f"PromptToPrompt(cross_replace={args.cross_replace}, self_replace={args.self_replace}); N = {args.n} prompt "
        f"pairs per swap kind, the source and the edited prompt from the same noise; judged by the probe; rates with "
        f"95 % Wilson intervals. {seconds:.0f} s.",
        "",
        "| swap | sampling of the edited prompt | swapped attribute right | rest kept as in the source image "
        "| mean pixel change from the source (± 1.96 SE) |",
        "|---|---|---:|---:|---:|",
    ]
    for kind, r in results.items():
        for name, label in (("plain", "plain (same noise)"), ("p2p", "prompt-to-prompt")):
            x = r[name]
            mean, se = mean_se(x["pixel_change_values"])
            lines.append(
                f"| {kind} | {label} | {wilson(x['edit_right'], x['n'])} | {wilson(x['kept_as_source'], x['n'])} | "
                f"{mean:.4f} ± {1.96 * se:.4f} |"
            )
    lines += [
        "",
        "'Rest kept': the probe reads the same other attribute (shape for a colour swap, colour for a shape swap) "
        "and the same side in the edited image as in the source image.",
        "",
        "Prompt-to-prompt's pixel change relative to plain sampling's, paired by prompt pair and noise (95 % interval "
        "of the mean paired difference, over plain's mean):",
        "",
    ]
    for kind, d in paired.items():
        lo, hi = d["relative_ci95"]
        lines.append(f"- {kind} swap: {d['relative']:+.1%} [{lo:+.1%}, {hi:+.1%}] (n = {d['n']})")
    lines += [
        "",
        f"![source | edited prompt, plain | edited prompt, prompt-to-prompt]({out.name}.png)",
    ]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    from personalization_table import stamp  # source hashes: the table's current/stale column

    record = {"results": results, "paired_pixel_change": paired, "seconds": seconds, **stamp("p2p")}
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    save_png(out.with_suffix(".png"), labeled_rows(grid))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
