#!/usr/bin/env python
"""Sweep each erasure method's main knobs on the `shapes` model, choose its setting on validation prompts, and
draw the whole grid as an erasure-vs-preservation (Pareto) plot.

Every grid point is one `jaxdiff erase --config configs/erase/<method>.py:shapes ... --config.eval.split=validation`
run per target: its figures rest on prompts that none of the scorecard's test prompts are, and on other noise seeds
(jaxdiff/erase/evaluate.py `validation_sets`), so a setting chosen here is not chosen on the test set. A point's
score is its joint score (harmonic mean of normalised erasure and preservation) averaged over the targets; a point
that failed or left a target unscored is not selectable. Cells are keyed and reused like the scorecard's (code
revision + command): an interrupted sweep resumes, a stale cell is recomputed.

  python tools/erasure_sweep.py --methods uce,mace --targets circle,red       # -> docs/erasure_sweep.{md,json,png}
  python tools/erasure_sweep.py --list                                        # the grids
  python tools/erasure_scorecard.py --settings docs/erasure_sweep.json        # score each method at its choice

The `:shapes` presets in configs/erase/ are where a selected setting is made the default (by hand, with the sweep's
figures in the commit).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jaxdiff import fileio  # noqa: E402
from jaxdiff.erase import evaluate as ev  # noqa: E402
from jaxdiff.erase import registry  # noqa: E402

# The knobs swept per method (a cartesian product; the :shapes preset's own value is among them where it has one).
# "anchor": "" is the method's own (the empty prompt for the closed forms), "@other" the first other concept of the
# target's kind (circle -> square, red -> green; jaxdiff.erase.config.OTHER_ANCHOR): on shapes a prompt without its
# shape word still draws a circle, so an edit towards "" cannot remove circles; a guide concept can.
# The first sweep (revision c4c6d0d, n = 32) put UCE's best λ at its grid's edge (2) and found RECE's epochs 1 and
# 2 equal, λ 0.1 and preserve scale -1 worst: the grids below move on from it. ESD's preset (lr 3e-4, 300 steps)
# left 56 % of circle images invalid (validation, n = 32, revision 3aed851). A first grid without the retain loss
# (revision 3aed851, n = 32) found Concept Ablation's preserved shapes falling 9-50 points on circle and box at
# every setting that erased; one retain-loss run (lr 1e-4, 300 steps, weight 1) kept them at 100 % and erased 88 %
# of boxes: the fine-tuning grids below cross the learning rate with the retain loss off (0, as published) and on.
GRIDS: dict[str, dict[str, tuple]] = {
    "uce": {"uce.lam": (0.5, 2.0, 8.0), "uce.preserve_scale": (1.0, 4.0), "anchor": ("", "@other")},
    # RECE's start (UCE λ 2 towards @other) came from the first sweep; its own erase step is swept here
    # (docs/erasure_sweep_rece.md: the official λ₂ 0.1 broke 20-31 % of images, λ₂ 8 with λ₁ 1 none).
    "rece": {"rece.lam": (0.1, 2.0, 8.0), "rece.preserve_scale": (0.1, 1.0)},
    # MACE's preset (docs/erasure_sweep_mace{,_preserve}.md): CFR λ and ρ, and the LoRA's learning rate.
    "mace": {"mace.lam": (1.0, 8.0), "mace.preserve_scale": (0.001, 1.0), "train.learning_rate": (1e-4, 1e-3)},
    "trce": {"anchor": ("", "@other"), "train.retain_weight": (0.0, 1.0)},
    "esd": {"train.learning_rate": (1e-4, 3e-4), "train.steps": (300,), "train.retain_weight": (0.0, 1.0)},
    "ablation": {"train.learning_rate": (1e-4, 5e-4), "train.steps": (300,), "train.retain_weight": (0.0, 1.0)},
    "all_but_one": {"train.learning_rate": (1e-4, 5e-4), "train.steps": (400,), "train.retain_weight": (0.0, 1.0)},
    "doco": {"train.learning_rate": (1e-4, 5e-4), "train.steps": (600,)},
    # SPM's erase target is relative to its surrogate c_sur ("" by default), as ESD's is to the empty prompt, which on
    # shapes draws circles: the grid crosses it with a guide concept, and latent anchoring on (λ_LA 1000) and off.
    # docs/erasure_sweep_spm.md ran at commit c22233e's preset (c_sur = ""); the preset now takes @other, so a "" point
    # (the preset's own value) repeats @other: rerun that doc from that commit, or give the grid an explicit surrogate.
    "spm": {"anchor": ("@other", ""), "spm.la_strength": (1000.0, 0.0)},
}
TARGETS = ("circle", "red")


def _scorecard():
    spec = importlib.util.spec_from_file_location("erasure_scorecard", ROOT / "tools" / "erasure_scorecard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_value(text: str):
    """A grid value from the command line: an int ("300"), a float ("5e-4", "1.0": written as the presets write
    them, so that a cell keyed by its overrides is the same cell) or else the text itself ("@other")."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_grid(text: str) -> dict[str, tuple]:
    """ "train.steps=300,600;train.retain_weight=1.0,3.0" -> {"train.steps": (300, 600), ...}."""
    grid = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, values = part.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ValueError(f"--grid part {part!r} is not KEY=V1,V2 (parts separated by ';')")
        grid[key.strip()] = tuple(parse_value(v.strip()) for v in values.split(","))
    if not grid:
        raise ValueError("--grid is empty")
    return grid


def grid_points(method: str, grid: dict[str, tuple] | None = None) -> list[dict]:
    """Every combination of the method's knobs (or of `grid`'s), as {"config.key": value}."""
    grid = grid or GRIDS[method]
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def point_name(point: dict) -> str:
    """A folder-safe name of a grid point: "uce.lam=0.5,uce.preserve_scale=-1,anchor=@other" (a knob at "", the
    preset's own value, is left out of the name and the overrides)."""
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items() if v != "")


def overrides(point: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in point.items() if v != ""]


def figures(report: dict) -> dict:
    """A cell's selection figures: erasure, preservation and their joint score (None where the run failed or did
    not score), with the n they rest on. Erasure is the normalised erasure clipped to [0, 1]; where the word-removed
    floor is too close to the unedited rate for that to mean anything (`evaluate.FLOOR_GAP_MIN`: on shapes, prompts
    without "circle" still draw round blobs), it is the valid erased rate itself, and `erasure_basis` says so."""
    if "failed" in report:
        return {"failed": report["failed"]}
    scores = report.get("scores", {})
    word = (report.get("erasure") or {}).get("word") or {}
    after = word.get("erased", {}).get("after") or {}
    erasure, basis = scores.get("normalised_erasure_shown"), "normalised"
    if scores.get("floor_gap") is not None and scores["floor_gap"] < ev.FLOOR_GAP_MIN:
        erasure, basis = after.get("rate"), "valid erased rate (floor too close to the unedited rate)"
    return {
        "erasure": erasure,
        "erasure_basis": basis,
        "preservation": scores.get("preservation"),
        "joint": ev.harmonic_mean(erasure, scores.get("preservation")),
        "n_word": after.get("n"),
        "n_preserved": report.get("preservation", {}).get("n"),
        "split": report.get("split"),
        "warnings": report.get("warnings", []),
    }


def mean_or_none(values: list) -> float | None:
    return None if not values or any(v is None for v in values) else float(sum(values) / len(values))


def summarise(cells: dict[str, dict[str, dict]]) -> dict:
    """{point name: {target: figures}} -> {point name: means over targets}; None where any target lacks one."""
    out = {}
    for name, by_target in cells.items():
        ok = all("failed" not in f for f in by_target.values())
        out[name] = {
            key: mean_or_none([f.get(key) for f in by_target.values()]) if ok else None
            for key in ("erasure", "preservation", "joint")
        }
        out[name]["failed"] = sorted(t for t, f in by_target.items() if "failed" in f)
    return out


def select(summary: dict) -> str | None:
    """The point with the highest mean joint score (ties: the better preservation); None when none scored."""
    scored = [(s["joint"], s["preservation"] or 0.0, name) for name, s in summary.items() if s["joint"] is not None]
    return max(scored)[2] if scored else None


def pareto_front(summary: dict) -> set[str]:
    """Points no other point beats on both erasure and preservation."""
    pts = {
        n: (s["erasure"], s["preservation"])
        for n, s in summary.items()
        if None not in (s["erasure"], s["preservation"])
    }
    return {
        n
        for n, (e, p) in pts.items()
        if not any(e2 >= e and p2 >= p and (e2, p2) != (e, p) for m, (e2, p2) in pts.items() if m != n)
    }


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def noise_note(n: int) -> str:
    """How far apart two settings must be to differ at n images per prompt set: the 95 % Wilson interval of a rate
    of 90 % (about where the selected settings sit)."""
    k = round(0.9 * n)
    lo, hi = ev.wilson(k, n)
    return (
        f"Noise: at n = {n} a measured rate of {k}/{n} = {k / n:.0%} has the 95 % Wilson interval {lo:.0%}–{hi:.0%}; "
        "settings a few hundredths apart in joint score are not told apart by this sweep (the selection then "
        "follows the point estimate; the scorecard's test run, at its larger n, is the figure to quote)."
    )


def markdown(results: dict, command: str, targets: list[str], n: int, out: Path = Path("docs/erasure_sweep.md")) -> str:
    lines = [
        "# Erasure settings chosen on validation prompts",
        "",
        f"Written by `{command}`. Each method's knobs are swept on `shapes`; every cell is a `jaxdiff erase` run "
        f"judged on **validation** prompts (none of them a test prompt of the scorecard, other noise seeds), "
        f"{n} images per prompt set, targets {', '.join(targets)}. Erasure: normalised erasure (0 = the unedited "
        "model, 1 = the word removed), clipped to [0, 1], or the valid erased rate where the word-removed floor is "
        "within 10 points of the unedited rate (marked †); preservation: the worst ratio after/before of the "
        "preserved attributes (both judges); joint: their harmonic mean. Figures are means over the targets. "
        "**bold**: the selected setting (highest mean joint score); *P*: on the Pareto front. Score the selected "
        f"settings on the test prompts with `python tools/erasure_scorecard.py --settings {out.with_suffix('.json')}`.",
        "",
        noise_note(n),
        "",
        f"![Pareto plot]({out.with_suffix('.png').name})",
        "",
    ]
    for method, r in results.items():
        lines += [
            f"## {method}",
            "",
            "| setting | erasure | preservation | joint | per target (joint) | |",
            "|---|---|---|---|---|---|",
        ]
        front = pareto_front(r["summary"])
        for name, s in r["summary"].items():
            per = "; ".join(
                f"{t}: "
                + (f"failed ({f['failed']})" if "failed" in f else _fmt(f.get("joint")))
                + ("†" if f.get("erasure_basis", "normalised") != "normalised" else "")
                for t, f in r["cells"][name].items()
            )
            label = name or "(preset)"
            label = f"**{label}**" if name == r["selected"] else label
            lines.append(
                f"| {label} | {_fmt(s['erasure'])} | {_fmt(s['preservation'])} | {_fmt(s['joint'])} | {per} | "
                f"{'P' if name in front else ''} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Erasure (x) vs preservation (y) of every scored point, one colour per method, the selected ones ringed."""
    from jaxdiff.images import save_png, scatter_plot

    points = [
        (s["erasure"], s["preservation"], method, name == r["selected"])
        for method, r in results.items()
        for name, s in r["summary"].items()
        if None not in (s["erasure"], s["preservation"])
    ]
    save_png(
        path,
        scatter_plot(
            points,
            "erasure (normalised; the valid erased rate where the floor is unreliable)",
            "preservation",
            "erasure vs preservation (validation)",
        ),
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", default=",".join(GRIDS), help=f"comma-separated, from {', '.join(GRIDS)}")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated shapes concepts")
    p.add_argument("--num-images", type=int, default=32, help="validation images per prompt set")
    p.add_argument("--test-num-images", type=int, default=128, help="the scorecard's images per set (avoided)")
    p.add_argument("--workdir", default="runs/erasure_sweep", help="one folder per cell, reused when still valid")
    p.add_argument("--out", default="docs/erasure_sweep.md", help="also writes .json (the selection) and .png")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    p.add_argument("--list", action="store_true", help="print the grids and exit")
    p.add_argument(
        "--grid",
        help="replace each method's grid: 'KEY=V1,V2;KEY=V1' over config keys, e.g. "
        "'train.steps=300,600;train.retain_weight=1.0,3.0' (floats written with a dot or an exponent)",
    )
    p.add_argument(
        "--revision",
        help="tabulate the cells computed at this code revision (their scorecard_key.json) and run nothing: a sweep "
        "finished before later commits, without mixing in cells of newer code",
    )
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(GRIDS))
    if unknown:
        p.error(f"no grid for {unknown}; choose from {', '.join(GRIDS)}")
    missing = sorted(set(methods) - set(registry.methods()))
    if missing:
        p.error(f"grids of methods the registry does not know: {missing}")
    try:
        custom = parse_grid(args.grid) if args.grid is not None else None
    except ValueError as e:
        p.error(str(e))
    if args.list:
        for m in methods:
            grid = custom or GRIDS[m]
            print(f"{m}: {len(grid_points(m, grid))} points: " + " x ".join(f"{k} {list(v)}" for k, v in grid.items()))
        return 0
    targets = [t for t in args.targets.split(",") if t]
    scorecard = _scorecard()
    revisions = {m: args.revision or scorecard.code_revision(m) for m in methods}
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    common = [
        "--config.eval.split=validation",
        f"--config.eval.num_images={args.num_images}",
        f"--config.eval.test_num_images={args.test_num_images}",
    ]
    results = {}
    for method in methods:
        cells: dict[str, dict[str, dict]] = {}
        points = {point_name(point): point for point in grid_points(method, custom)}
        for name, point in points.items():
            cells[name] = {}
            for target in targets:
                report = scorecard.run_cell(
                    method,
                    target,
                    workdir,
                    args.timeout,
                    [*overrides(point), *common],
                    revisions[method],
                    name=f"{method}-{target}-{name}",
                    attacks=False,
                    reuse_only=bool(args.revision),
                )
                cells[name][target] = figures(report)
        summary = summarise(cells)
        chosen = select(summary)
        results[method] = {
            "cells": cells,
            "summary": summary,
            "selected": chosen,
            "overrides": overrides(points[chosen]) if chosen else [],
        }
        s = summary.get(chosen) if chosen else None
        print(
            f"{method}: selected {chosen or 'nothing (no point scored)'}"
            + (
                f" (joint {_fmt(s['joint'])}, erasure {_fmt(s['erasure'])}, preservation {_fmt(s['preservation'])})"
                if s
                else ""
            ),
            flush=True,
        )
    command = scorecard.command_line("erasure_sweep.py", argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(out, markdown(results, command, targets, args.num_images, out) + "\n")
    record = {
        "command": command,
        "revision": revisions[methods[0]] if len(set(revisions.values())) == 1 else revisions,
        "split": "validation",
        "num_images": args.num_images,
        "targets": targets,
        "selected": {
            m: {"setting": r["selected"], "overrides": r["overrides"]} for m, r in results.items() if r["selected"]
        },
        "results": results,
    }
    fileio.atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
