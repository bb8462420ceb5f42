#!/usr/bin/env python
"""Why did an erasure lose what it should keep? Re-draw one prompt set of a finished `jaxdiff erase` run on `shapes`
(the same prompts and noise seeds as its report), judge the unedited and the edited images with both judges, and
print where they fail: the pixel judge's reasons (no object, fragments, more objects than asked, a colour or shape
that is none of the palette's) and the probe's wrong names, grouped by the prompt's colour, shape and background;
then write a PNG of the failing images, unedited above edited.

  python tools/erasure_inspect.py runs/scorecard/ablation-red                   # the preserved prompts
  python tools/erasure_inspect.py runs/scorecard/uce-circle --set word --out /tmp/uce_word.png

An SPM run (per-prompt adapters, no OUT/model) is refused; every other method writes the edited model it reads.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETS = ("preserved", "word", "synonyms", "heldout")


def failures(verdicts: dict, scenes, kinds=("shape", "colour")) -> list[tuple[int, str]]:
    """(index, why) of each image that fails the report's preservation test on either attribute: the pixel judge's
    reason when it finds no valid object, else "probe: KIND X" / "pixel: KIND X" for a wrong name (both judges must
    name the prompt's value)."""
    from jaxdiff.erase import evaluate as ev

    valid = verdicts["pixel"]["valid"]
    named = {(judge, kind): ev.names(verdicts, judge, kind) for judge in ("probe", "pixel") for kind in kinds}
    out = []
    for i in range(len(scenes)):
        if not valid[i]:
            out.append((i, str(verdicts["pixel"]["reason"][i])))
            continue
        for kind in kinds:
            truth = getattr(scenes[i].objects[0], kind)
            wrong = [
                f"{judge}: {kind} {named[judge, kind][i]}"
                for judge in ("probe", "pixel")
                if named[judge, kind][i] != truth
            ]
            if wrong:
                out.append((i, "; ".join(wrong)))
                break
    return out


def by_scene(found: list[tuple[int, str]], scenes) -> list[tuple[tuple[str, str, str, str], int]]:
    """Counts of (colour, shape, background, why) over the failing images, most frequent first."""
    counts = collections.Counter(
        (scenes[i].objects[0].colour, scenes[i].objects[0].shape, scenes[i].background, why) for i, why in found
    )
    return counts.most_common()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the OUT folder of a `jaxdiff erase` run on shapes (config.json, model/, report.json)")
    p.add_argument("--set", default="preserved", choices=SETS, help="the prompt set to re-draw (default: preserved)")
    p.add_argument("--out", default="", help="PNG of the failing images (default: RUN/inspect_<set>.png)")
    p.add_argument("--max-images", type=int, default=16, help="failing images in the PNG")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    run = Path(args.run)
    for needed in ("config.json", "model"):
        if not (run / needed).exists():
            spm = needed == "model" and (run / "adapter").exists()
            hint = " (an SPM run writes adapters, not a model)" if spm else ""
            sys.exit(f"erasure_inspect: {run} has no {needed}{hint}: give the OUT folder of a finished jaxdiff erase")

    import ml_collections as mlc

    from jaxdiff.erase import evaluate as ev
    from jaxdiff.erase import run as erase_run
    from jaxdiff.erase.job import Job, probe
    from jaxdiff.images import labeled_rows, save_png
    from jaxdiff.sampling.pipeline import load_pipeline

    config = mlc.ConfigDict(json.loads((run / "config.json").read_text()))
    job = Job(erase_run._resolved(config), run, progress=False)  # loads the unedited model; writes nothing
    concept = job.concept
    sets = erase_run._sets(job, concept)  # the report's prompt sets, in its order
    prompts, scenes = sets[args.set]
    if not prompts:
        sys.exit(f"erasure_inspect: the run's {args.set!r} set is empty ({config.eval.split} split)")
    index = list(sets).index(args.set)  # `erase` seeds each set's noise by its place among all four
    latents = ev.noise(len(prompts), job.latent_shape, erase_run._noise_seed(config.eval) + index)
    edited = load_pipeline(str(run / "model")).params["unet"]
    images = {"unedited": job.images(prompts, latents), "edited": job.images(prompts, latents, edited)}
    judged = {name: ev.judge_images(probe(), im) for name, im in images.items()}

    kinds = ("shape", "colour") if args.set == "preserved" else (ev.OTHER[concept.kind],)
    print(f"{run}: {config.method} erasing {concept.name}, {len(prompts)} {args.set} prompts ({config.eval.split})")
    found = {}
    for name, verdicts in judged.items():
        found[name] = failures(verdicts, scenes, kinds)
        accuracy = {k: ev.correct(verdicts, scenes, k)["both"].mean() for k in kinds}
        reasons = collections.Counter(str(r) for r in verdicts["pixel"]["reason"] if r != "ok")
        print(
            f"  {name}: "
            + ", ".join(f"{k} {100 * a:.0f}% (both judges)" for k, a in accuracy.items())
            + f"; pixel judge invalid {sum(reasons.values())}: {dict(reasons) or 'none'}"
        )
    print("  failing edited images by (colour, shape, background, why):")
    for (colour, shape, bg, why), count in by_scene(found["edited"], scenes):
        print(f"    {count:3d}  {colour} {shape} on {bg}: {why}")
    worse = [i for i, _ in found["edited"] if i not in {j for j, _ in found["unedited"]}][: args.max_images]
    out = Path(args.out or run / f"inspect_{args.set}.png")
    if worse:
        rows = [("unedited", images["unedited"][worse]), (f"edited ({config.method})", images["edited"][worse])]
        save_png(out, labeled_rows(rows))
        print(f"wrote {out}: the {len(worse)} images that fail only after the edit, unedited above edited")
    else:
        print("no image fails only after the edit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
