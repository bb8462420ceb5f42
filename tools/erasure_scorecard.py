#!/usr/bin/env python
"""Run every erasure method on the `shapes` model for several targets and tabulate erasure, preservation,
robustness and cost, all judged by the shapes probe (see jaxdiff/erase/evaluate.py for what each figure means).

Each (method, target) cell is one `jaxdiff erase --config configs/erase/<method>.py:shapes ... --attacks` run in
its own process (so its peak memory is its own), written to <workdir>/<method>-<target>/; a cell whose report.json
exists is not rerun, so an interrupted scorecard resumes. A cell that fails is reported as failed, with the error.

  python tools/erasure_scorecard.py                                 # all methods x circle, red, box -> docs/
  python tools/erasure_scorecard.py --methods uce,esd --targets circle --out /tmp/scorecard.md

Targets: a shape (circle), a colour (red), and a concept named with a synonym (box = the square). Each target's
preserved concepts are the other concepts of its kind; the anchor of methods that need one is another concept of
the same kind.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from jaxdiff.erase import registry

ROOT = Path(__file__).resolve().parent.parent  # the cells' configs/erase/<method>.py are relative to it
TARGETS = ("circle", "red", "box")


def cell_args(method: str, target: str) -> list[str]:
    from jaxdiff.erase import evaluate as ev

    concept = ev.resolve(target)
    others = list(concept.others)
    args = [f"--config.concept={target}", f"--config.preserve={';'.join(others)}"]
    anchor = registry.get(method).anchor
    if anchor is not None:
        args.append(f"--config.anchor={others[0] if anchor == 'other_concept' else concept.kind}")
    return args


def run_cell(method: str, target: str, workdir: Path, timeout: int, extra: list[str]) -> dict:
    out = workdir / f"{method}-{target}"
    report = out / "report.json"
    if report.is_file():
        return json.loads(report.read_text())
    cmd = [
        sys.executable,
        "-m",
        "jaxdiff.cli",
        "erase",
        "--config",
        f"configs/erase/{method}.py:shapes",
        *cell_args(method, target),
        "--out",
        str(out),
        "--attacks",
        "--no-progress",
        *extra,
    ]
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        lines = [x for x in (proc.stderr or proc.stdout).strip().splitlines() if x.strip()]
        return {"failed": lines[-1] if lines else f"exit status {proc.returncode}"}
    seconds = time.time() - start
    (out / "scorecard_seconds.txt").write_text(f"{seconds:.1f}\n")  # the whole cell: edit, sampling, attacks
    print(f"  done in {seconds:.0f} s: {proc.stdout.strip().splitlines()[0]}", flush=True)
    return json.loads(report.read_text())


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def row(method: str, target: str, r: dict) -> str:
    if "failed" in r:
        return f"| {method} | {target} | failed: {r['failed'][:120]} |" + " |" * 10
    e, p, rob, cost = r["erasure"], r["preservation"], r.get("robustness", {}), r["cost"]
    after = lambda name: _pct(e[name]["after"]) if e.get(name) else "–"  # noqa: E731
    return (
        f"| {method} | {target} | {after('word')} | {after('synonyms')} | {after('heldout')} "
        f"| {_pct(p['shape_acc']['after'])} | {_pct(p['colour_acc']['after'])} | {p['frechet']:.0f} "
        f"| {_pct(rob.get('regenerating_embedding', {}).get('success'))} "
        f"| {_pct(rob.get('soft_prompt', {}).get('success'))} | {cost['seconds']:.0f} | {cost['peak_rss_gb']:.2f} |"
    )


def baseline_rows(results: dict) -> list[str]:
    """The unedited model on each target's prompt sets (identical across methods: same prompts and seeds)."""
    lines = []
    for target in dict.fromkeys(t for _, t in results):
        ok = [r for (m, t), r in results.items() if t == target and "failed" not in r]
        if not ok:
            continue
        r = ok[0]
        e, p = r["erasure"], r["preservation"]
        without = next(
            (x["erasure"]["word"].get("without_word") for x in ok if "without_word" in x["erasure"]["word"]), None
        )
        if without is not None:
            lines.append(f"| *unedited, word removed* | {target} | {_pct(without)} | | | | | | | | | |")
        before = lambda name: _pct(e[name]["before"]) if e.get(name) else "–"  # noqa: E731
        lines.append(
            f"| *unedited* | {target} | {before('word')} | {before('synonyms')} | {before('heldout')} "
            f"| {_pct(p['shape_acc']['before'])} | {_pct(p['colour_acc']['before'])} "
            f"| {p.get('frechet_floor', float('nan')):.0f} (seed noise) | | | | |"
        )
    return lines


def cell_seconds(workdir: Path, results: dict) -> list[float]:
    """Wall-clock seconds of each finished cell's whole `jaxdiff erase` run (recorded when it ran)."""
    out = []
    for method, target in results:
        f = workdir / f"{method}-{target}" / "scorecard_seconds.txt"
        if f.is_file():
            out.append(float(f.read_text()))
    return out


def markdown(results: dict, command: str, seconds: list[float]) -> str:
    any_ok = next((r for r in results.values() if "failed" not in r), None)
    n = any_ok["erasure"]["word"]["n"] if any_ok else "?"
    atk = any_ok.get("robustness", {}) if any_ok else {}
    soft = atk.get("soft_prompt", {})
    lines = [
        "# Erasure scorecard on the `shapes` model",
        "",
        f"Regenerate with `{command}`"
        + (f" ({sum(seconds) / 60:.0f} min for {len(seconds)} cells on this 2-core CPU)" if seconds else "")
        + ". Each row is one `jaxdiff erase` run "
        "(configs/erase/<method>.py:shapes); every figure is read by the shapes probe from generated images "
        f"({n} per prompt set, 25 DDIM steps, guidance 5, the same seeds before and after the edit).",
        "",
        "- **Erasure** (lower is better): % of images in which the probe sees the target, for prompts naming it with "
        "the erased word (train templates), with its synonyms / descriptive phrases, and with held-out templates.",
        "  The *word removed* rows run the unedited model on the word prompts with the word deleted (same seeds): "
        "what a perfect erasure towards nothing gives, since the model's prior fills the gap (e.g. round blobs for "
        "a shape left unnamed).",
        "- **Preservation**: probe shape / colour accuracy on prompts of the *other* concepts of the same kind, and "
        "the Fréchet distance on probe features between the edited and the unedited model's images of those prompts "
        "(the *unedited* rows give the distance between two seed sets of the unedited model: sampling noise alone).",
        "- **Robustness** (lower is better): % of attack images in which the probe sees the target: RECE's closed-form "
        f"regenerating embedding, and a white-box soft-prompt attack ({soft.get('tokens', '?')} input embeddings, "
        f"{soft.get('steps', '?')} Adam steps on the edited model's denoising loss of the original model's images).",
        "- **Cost**: wall-clock time of the edit (fine-tuning includes compilation) and the process's peak RSS.",
        "",
        "Every cell preserves the other concepts of the target's kind (`--config.preserve`); Concept Ablation and "
        "DoCo take the first of them as their anchor (circle -> square, red -> green, box -> circle), TRCE maps onto "
        "the generic word (shape / colour). The hyper-parameters are each config's `:shapes` variant, chosen by short "
        "trials on this model, not by a sweep; a method that does little here may need a larger budget.",
        "",
        "| method | target | erasure: word | synonyms | held-out | preserved shape acc | preserved colour acc "
        "| Fréchet vs unedited | regen. embedding attack | soft-prompt attack | edit s | peak GiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += baseline_rows(results)
    lines += [row(m, t, r) for (m, t), r in results.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from jaxdiff import fileio

    known = list(registry.methods())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(known), help="comma-separated (default: all)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated shapes concepts")
    p.add_argument("--workdir", default="runs/scorecard", help="one folder per cell; finished cells are reused")
    p.add_argument("--out", default="docs/erasure_scorecard.md")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    p.add_argument("extra", nargs="*", help="--config.KEY=VALUE overrides passed to every cell (after --)")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(known))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(known)}")
    targets = [t for t in args.targets.split(",") if t]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    for target in targets:
        for method in methods:
            results[(method, target)] = run_cell(method, target, workdir, args.timeout, args.extra)
    command = "python tools/erasure_scorecard.py" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    text = markdown(results, command, cell_seconds(workdir, results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(out, text)
    (out.with_suffix(".json")).write_text(
        json.dumps({f"{m}-{t}": r for (m, t), r in results.items()}, indent=2, default=str) + "\n"
    )
    print(text)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
