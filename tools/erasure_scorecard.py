#!/usr/bin/env python
"""Run every erasure method on the `shapes` model for several targets and tabulate erasure, preservation,
robustness and cost, judged by the shapes probe and the pixel judge (see jaxdiff/erase/evaluate.py for what each
figure means: valid-only erasure, invalid share, normalised erasure, preservation of both attributes, joint score).

Each (method, target) cell is one `jaxdiff erase --config configs/erase/<method>.py:shapes ... --attacks` run in
its own process (so its peak memory is its own), written to <workdir>/<method>-<target>/. A cell is keyed by the
code revision of its method (the last commit to what that method's erasure runs, plus a hash of uncommitted
changes there: SOURCES without the other methods' modules), a hash of its command and a hash of its method's config
file: a finished cell with the same key is reused (an interrupted scorecard resumes), any other is deleted and
recomputed. A cell that fails is reported as failed,
with the error.

  python tools/erasure_scorecard.py                                 # all methods x circle, red, box -> docs/
  python tools/erasure_scorecard.py --methods uce,esd --targets circle --out /tmp/scorecard.md
  python tools/erasure_scorecard.py --methods esd --train-seeds 3    # + cells at --config.seed=1, 2

Training seeds: a method that trains (every kind but "closed_form") can be run at several `config.seed` values (the
evaluation's prompts and noise seeds are unchanged); the table then gives the joint score's mean and range over
them beside the seed-0 row, so a lucky seed is visible. The "goal" section checks issue 12's bar per method on the
seed-0 rows: normalised erasure >= 0.8 with both preserved accuracies within 5 points of the unedited model.

Targets: a shape (circle), a colour (red), and a concept named with a synonym (box = the square). Each target's
preserved concepts are the other concepts of its kind; the anchor of methods that need one is another concept of
the same kind.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from jaxdiff.erase import registry
from jaxdiff.erase.config import OTHER_ANCHOR, resolve_anchor

ROOT = Path(__file__).resolve().parent.parent  # the cells' configs/erase/<method>.py are relative to it
TARGETS = ("circle", "red", "box")
KEY = "scorecard_key.json"


# What an erase run's figures depend on: the library but its personalization, protection and ControlNet commands
# (nothing of erasure imports them), and the erase configs.
SOURCES = (
    "jaxdiff",
    ":(exclude)jaxdiff/personalize",
    ":(exclude)jaxdiff/protect",
    ":(exclude)jaxdiff/control",
)
# A method's config file (configs/erase/<method>.py) is keyed by its content in each of that method's cells, so
# that choosing one method's preset leaves the other methods' cells valid. Likewise a method's own module
# (jaxdiff/erase/<method>.py) keys only its own cells, except the modules that every cell runs: the attacks use
# RECE's regenerating embedding (rece.py), which builds on UCE (uce.py).
RUN_BY_EVERY_CELL = ("uce", "rece")


def method_sources(method: str = "") -> tuple[str, ...]:
    """SOURCES for one method's cells: without the other methods' modules (but RUN_BY_EVERY_CELL); all of them
    when `method` is empty."""
    if not method:
        return SOURCES
    others = [m for m in registry.methods() if m != method and m not in RUN_BY_EVERY_CELL]
    return (*SOURCES, *(f":(exclude)jaxdiff/erase/{m}.py" for m in others))


def code_revision(method: str = "") -> str:
    """The last commit that changed what `method`'s cells run (`method_sources`; every method's when empty), plus
    a hash of their uncommitted changes when there are any (a commit to tools/, docs/, another command's code or
    another method's module leaves cells valid)."""
    sources = method_sources(method)

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    head = git("log", "-1", "--format=%H", "--", *sources).strip() or "unknown"  # last code commit
    diff = git("diff", "HEAD", "--", *sources)
    untracked = git("ls-files", "--others", "--exclude-standard", "--", *sources).split()
    for f in sorted(untracked):
        diff += f + (ROOT / f).read_text(errors="replace") if (ROOT / f).is_file() else ""
    return head + ("+" + hashlib.sha256(diff.encode()).hexdigest()[:12] if diff else "")


def cell_key(cmd_args: list[str], revision: str) -> dict:
    """What a cell's result depends on: the code revision, the cell's command (config file and overrides) and the
    content of the config file it names ("configs/erase/uce.py:shapes" -> that file)."""
    path = ROOT / cmd_args[0].split(":")[0] if cmd_args else None
    content = path.read_bytes() if path is not None and path.is_file() else b""
    return {
        "revision": revision,
        "config": hashlib.sha256("\0".join(cmd_args).encode()).hexdigest()[:16],
        "config_file": hashlib.sha256(content).hexdigest()[:16],
    }


def reusable(out: Path, key: dict) -> bool:
    """A finished cell of this key, measured with the current report format."""
    try:
        report = json.loads((out / "report.json").read_text())
        return json.loads((out / KEY).read_text()) == key and "scores" in report
    except (OSError, ValueError):
        return False


def cell_args(method: str, target: str, extra: list[str] = ()) -> list[str]:
    """The target's concept, preserved concepts and (for methods that need one, unless `extra` sets it) anchor."""
    from jaxdiff.erase import evaluate as ev

    concept = ev.resolve(target)
    others = list(concept.others)
    args = [f"--config.concept={target}", f"--config.preserve={';'.join(others)}"]
    anchor = registry.get(method).anchor
    if anchor is not None and not any(x.startswith("--config.anchor=") for x in extra):
        args.append(f"--config.anchor={others[0] if anchor == 'other_concept' else concept.kind}")
    return args


def resolve_extra(extra: list[str], target: str) -> list[str]:
    """`extra` with `--config.anchor=@other` replaced by the concept it names for `target` (the first other concept
    of its kind), so that a cell's command, and its key, say which anchor it ran with."""
    other = f"--config.anchor={resolve_anchor(OTHER_ANCHOR, [target], True)}"
    return [other if x == f"--config.anchor={OTHER_ANCHOR}" else x for x in extra]


def cell_name(method: str, target: str, seed: int = 0) -> str:
    """A cell's folder: "trce-circle" (training seed 0), "trce-circle-seed2"."""
    return f"{method}-{target}" + (f"-seed{seed}" if seed else "")


def command_line(tool: str, argv: list[str] | None) -> str:
    """The command a doc says regenerates it: "python tools/<tool> ARGS", shell-quoted (a --grid holds ';')."""
    given = sys.argv[1:] if argv is None else argv
    return f"python tools/{tool}" + (" " + shlex.join(given) if given else "")


def run_cell(
    method: str,
    target: str,
    workdir: Path,
    timeout: int,
    extra: list[str],
    revision: str = "",
    *,
    name: str = "",
    attacks: bool = True,
    reuse_only: bool = False,
) -> dict:
    """One `jaxdiff erase` run in <workdir>/<name or method-target>, reused when its key matches; a failed run is
    {"failed": its last error line}. reuse_only: never run; a cell without a finished run of this key is failed."""
    out = workdir / (name or cell_name(method, target))
    attack = ["--attacks"] if attacks else []
    extra = resolve_extra(extra, target)
    args = [f"configs/erase/{method}.py:shapes", *cell_args(method, target, extra), *attack, *extra]
    key = cell_key(args, revision or code_revision(method))
    if reusable(out, key):
        return json.loads((out / "report.json").read_text())
    if reuse_only:
        return {"failed": f"no finished cell of revision {key['revision'][:12]}"}
    if out.exists():  # stale: another code revision or command, or an older report format; never reused
        shutil.rmtree(out)
    cmd = [
        sys.executable,
        "-m",
        "jaxdiff.cli",
        "erase",
        "--config",
        f"configs/erase/{method}.py:shapes",
        *cell_args(method, target, extra),
        "--out",
        str(out),
        *attack,
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
    (out / KEY).write_text(json.dumps(key) + "\n")
    print(f"  done in {seconds:.0f} s: {proc.stdout.strip().splitlines()[0]}", flush=True)
    return json.loads((out / "report.json").read_text())


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _ci(r: dict | None) -> str:
    """A rate with its 95 % Wilson interval: "41% [33–49]"."""
    if not r or r.get("rate") is None:
        return "–"
    lo, hi = r["ci"]
    return f"{100 * r['rate']:.0f}% [{100 * lo:.0f}–{100 * hi:.0f}]"


def _num(x) -> str:
    return "–" if x is None else f"{x:.2f}"


COLUMNS = (
    "method",
    "target",
    "n",
    "erased (valid, both judges) [95% CI]",
    "erased: synonyms / held-out",
    "invalid",
    "probe-only sees it (old)",
    "normalised erasure (raw)",
    "preserved shape, both judges",
    "preserved colour, both judges",
    "erased prompts' other attribute",
    "paired L2 [95% CI]",
    "preservation (norm.)",
    "joint",
    "joint over training seeds: mean [min–max], valid erased range",
    "regen. embedding attack",
    "soft-prompt attack",
    "edit s",
    "warnings",
)


def seeds_cell(runs: list[dict]) -> str:
    """The joint score and the valid erased rate over a cell's training seeds: "0.81 [0.75–0.88], erased 73–82%
    (3 seeds)"; "–" for one run, and the failures counted."""
    if len(runs) < 2:
        return "–"
    ok = [r for r in runs if "failed" not in r and r.get("scores", {}).get("joint") is not None]
    joints = [r["scores"]["joint"] for r in ok]
    erased = [r["erasure"]["word"]["erased"]["after"]["rate"] for r in ok if "erasure" in r]
    failed = len(runs) - len(ok)
    text = f"{sum(joints) / len(joints):.2f} [{min(joints):.2f}–{max(joints):.2f}]" if joints else "–"
    if erased:
        text += f", erased {100 * min(erased):.0f}–{100 * max(erased):.0f}%"
    return text + f" ({len(ok)} seeds" + (f", {failed} failed)" if failed else ")")


GOAL_ERASURE, GOAL_POINTS = 0.8, 0.05


def meets_goal(r: dict) -> bool | None:
    """Issue 12's bar on one cell: normalised erasure >= 0.8 (the valid erased rate where the word-removed floor is
    unreliable) and the preserved shape and colour accuracies (both judges) within 5 points of the unedited model's;
    None where the cell failed or lacks a figure."""
    if "failed" in r:
        return None
    from jaxdiff.erase import evaluate as ev

    scores = r.get("scores", {})
    norm = scores.get("normalised_erasure")
    if scores.get("floor_gap") is not None and scores["floor_gap"] < ev.FLOOR_GAP_MIN:
        # The floor is within 10 points of the unedited rate (circle on shapes): a normalised erasure of 1 may
        # rest on 3 % of images, so the valid erased rate itself must reach the bar (as the sweep's figures do).
        norm = r["erasure"]["word"]["erased"]["after"]["rate"]
    preserved = r["preservation"]["preserved"]
    pairs = [(preserved[k]["both"]["before"]["rate"], preserved[k]["both"]["after"]["rate"]) for k in preserved]
    if norm is None or any(None in p for p in pairs):
        return None
    return norm >= GOAL_ERASURE and all(after >= before - GOAL_POINTS for before, after in pairs)


def goal_lines(results: dict, seeds: dict | None = None) -> list[str]:
    """Per method: the targets where it meets issue 12's bar, out of those it ran; with training seeds, also on how
    many seeds of each target it does (`seeds`: {(method, target): [reports, seed 0 first]})."""
    lines = [
        "",
        f"**Goal** (issue 12: normalised erasure ≥ {GOAL_ERASURE} — the valid erased rate where the floor is within "
        f"10 points of the unedited rate — with preserved shape and colour, both judges, within "
        f"{100 * GOAL_POINTS:.0f} points of the unedited model, on two of the three targets):",
        "",
    ]
    for method in dict.fromkeys(m for m, _ in results):
        verdicts = {t: meets_goal(r) for (m, t), r in results.items() if m == method}
        met = [t for t, v in verdicts.items() if v]
        status = "**met**" if len(met) >= 2 else "not met"
        lines.append(
            f"- {method}: {status} — on {', '.join(met) or 'no target'} ({len(met)} of {len(verdicts)}"
            + (f"; {sum(v is None for v in verdicts.values())} unscored" if None in verdicts.values() else "")
            + ")"
            + seed_counts(method, seeds or {})
        )
    return lines


def seed_counts(method: str, seeds: dict) -> str:
    """ "; over training seeds: circle 1/3, box 3/3" — on how many of its seeds' cells the bar is met, per target."""
    parts = [
        f"{t} {sum(bool(meets_goal(r)) for r in runs)}/{len(runs)}"
        for (m, t), runs in seeds.items()
        if m == method and len(runs) > 1
    ]
    return "; over training seeds: " + ", ".join(parts) if parts else ""


def row(method: str, target: str, r: dict, seeds: list[dict] | None = None) -> str:
    if "failed" in r:
        return f"| {method} | {target} | failed: {r['failed'][:120]} |" + " |" * (len(COLUMNS) - 3)
    e, p, rob, cost, sc = r["erasure"], r["preservation"], r.get("robustness", {}), r["cost"], r.get("scores", {})
    w = e["word"]
    after = lambda name: _pct(e[name]["erased"]["after"]["rate"]) if e.get(name) else "–"  # noqa: E731
    other = p["erased_prompts"]["attribute"]
    d = p["paired_distance"]
    cells = [
        method,
        target,
        str(w["n"]),
        _ci(w["erased"]["after"])
        + (f" ({w['anchor']['name']} instead: {_pct(w['anchor']['after']['rate'])})" if w.get("anchor") else ""),
        f"{after('synonyms')} / {after('heldout')}",
        _ci(w["invalid"]["after"]),
        _ci(w["probe_only"]["after"]),
        _num(sc.get("normalised_erasure")),
        _ci(p["preserved"]["shape"]["both"]["after"]),
        _ci(p["preserved"]["colour"]["both"]["after"]),
        f"{other} {_ci(p['erased_prompts'][other]['both']['after'])}",
        f"{d['mean']:.1f} [{d['ci'][0]:.1f}–{d['ci'][1]:.1f}]",
        _num(sc.get("preservation")),
        _num(sc.get("joint")),
        seeds_cell(seeds or [r]),
        _pct(rob.get("regenerating_embedding", {}).get("success")),
        _pct(rob.get("soft_prompt", {}).get("success")),
        f"{cost['seconds']:.0f}",
        short_warnings(r),
    ]
    return "| " + " | ".join(cells) + " |"


def short_warnings(r: dict) -> str:
    """The report's warnings in a few words: each attribute's largest fall, and an unreliable floor."""
    from jaxdiff.erase import evaluate as ev

    parts = [f"{k} {100 * b:.0f}→{100 * a:.0f}% ({j}, {w})" for k, (b, a, j, w) in ev.worst_drops(r).items()]
    if any(w.startswith("normalised erasure is unreliable") for w in r.get("warnings", [])):
        parts.append("floor within 10 points")
    return "; ".join(parts) or "none"


def baseline_rows(results: dict) -> list[str]:
    """The unedited model on each target's prompt sets (identical across methods: same prompts and seeds), and
    on the word prompts with the word removed (the erasure floor)."""
    lines = []
    blank = len(COLUMNS) - 8
    for target in dict.fromkeys(t for _, t in results):
        ok = [r for (m, t), r in results.items() if t == target and "failed" not in r]
        if not ok:
            continue
        r = ok[0]
        e, p = r["erasure"], r["preservation"]
        w = e["word"]
        if "floor" in w:
            f = w["floor"]
            lines.append(
                f"| *unedited, word removed* | {target} | {f['erased']['n']} | {_ci(f['erased'])} | | "
                f"{_ci(f['invalid'])} | {_ci(f['probe_only'])} | 1 (by definition) |" + " |" * blank
            )
        before = lambda name: _pct(e[name]["erased"]["before"]["rate"]) if e.get(name) else "–"  # noqa: E731
        other = p["erased_prompts"]["attribute"]
        d = p.get("paired_distance_other_seeds")
        lines.append(
            f"| *unedited* | {target} | {w['n']} | {_ci(w['erased']['before'])} | {before('synonyms')} / "
            f"{before('heldout')} | {_ci(w['invalid']['before'])} | {_ci(w['probe_only']['before'])} | 0 "
            f"| {_ci(p['preserved']['shape']['both']['before'])} | {_ci(p['preserved']['colour']['both']['before'])} "
            f"| {other} {_ci(p['erased_prompts'][other]['both']['before'])} "
            + (f"| {d['mean']:.1f} [{d['ci'][0]:.1f}–{d['ci'][1]:.1f}] (other seeds) " if d else "| – ")
            + "| 1 | | | | | |"
        )
    return lines


def cell_seconds(workdir: Path, results: dict, train_seeds: int = 1) -> list[float]:
    """Wall-clock seconds of each finished cell's whole `jaxdiff erase` run (recorded when it ran), the training-seed
    cells (`METHOD-TARGET-seedK`, K < train_seeds) included."""
    out = []
    for method, target in results:
        for f in (workdir / cell_name(method, target, k) / "scorecard_seconds.txt" for k in range(train_seeds)):
            if f.is_file():
                out.append(float(f.read_text()))
    return out


LEGEND = """\
- **Erased** (higher is better): % of images that are *valid* (the pixel judge finds one clean object with the
  prompt's other attribute: erasing "circle" from "a red circle" must leave a red object) and in which *neither*
  judge (probe, pixel judge) sees the target; prompts naming it with the erased word (train templates), with its
  synonyms / descriptive phrases, and with held-out templates. **Invalid**: % of images that are not valid (they
  never count as erased). **Probe-only** is the old figure (the probe alone sees the target; lower is better).
- **Normalised erasure** = (erased after − erased unedited) / (erased *word removed* − erased unedited): 0 = no
  change, 1 = what the unedited model draws with the word deleted from the prompt (same seeds); raw value, not
  clipped. A warning says when the floor is within 10 points of the unedited rate (the scale is then unreliable).
- **Preservation**: shape / colour accuracy, both judges at once (each must name the prompt's value; an invalid
  image is wrong), on prompts of the *other* concepts of the target's kind, and the erased prompts' other attribute;
  chance 33 % (shape), 25 % (colour). **Paired L2**: mean distance between the unedited and edited image's probe
  features, same prompt and seed (bootstrap 95 % interval; the *unedited* row: two seed sets of the unedited model).
  **Preservation (norm.)** = the smallest edited / unedited ratio of the three both-judges accuracies.
- **Joint** = harmonic mean of normalised erasure and normalised preservation, each clipped to [0, 1].
- **Warnings**: per attribute, its largest fall among the preserved accuracies (either judge) that fell by more
  than 10 points (report.md lists every one); "floor within 10 points": normalised erasure is unreliable.
- All rates: n images per prompt set, 95 % Wilson interval in brackets.
"""


def shapes_guidance() -> str:
    """The guidance the cells sample with: the shapes model's default (config.eval.guidance < 0)."""
    path = ROOT / "jaxdiff" / "assets" / "shapes" / "sampling_defaults.json"
    return f"{json.loads(path.read_text())['guidance']:g}" if path.is_file() else "7.5"


def revision_text(revisions: dict[str, str]) -> str:
    """Where the cells were measured: "code revision `abc`" or, where methods differ, "code revisions `abc`
    (uce, rece), `def` (doco)" (each method's own, `code_revision(method)`)."""
    groups: dict[str, list[str]] = {}
    for method, rev in revisions.items():
        groups.setdefault(rev[:12], []).append(method)
    if len(groups) == 1:
        return f"code revision `{next(iter(groups))}`"
    return "code revisions " + ", ".join(f"`{rev}` ({', '.join(ms)})" for rev, ms in groups.items())


def markdown(
    results: dict, command: str, seconds: list[float], revisions: dict | None = None, seeds: dict | None = None
) -> str:
    any_ok = next((r for r in results.values() if "failed" not in r), None)
    n = any_ok["erasure"]["word"]["n"] if any_ok else "?"
    atk = any_ok.get("robustness", {}) if any_ok else {}
    soft = atk.get("soft_prompt", {})
    lines = [
        "# Erasure scorecard on the `shapes` model",
        "",
        f"Regenerate with `{command}`"
        + (
            f" ({sum(seconds) / 60:.0f} min: the sum of its {len(seconds)} cells' wall-clock times on this 2-core "
            "CPU, where cells ran side by side the sum overstates)"
            if seconds
            else ""
        )
        + ". Each row is one `jaxdiff erase` run (configs/erase/<method>.py:shapes); every figure is read by the "
        f"shapes probe and the pixel judge from generated images ({n} per prompt set, 25 DDIM steps, guidance "
        f"{shapes_guidance()} (the model's default), the same seeds before and after the edit)"
        + (f"; every cell measured at {revision_text(revisions)}." if revisions else "."),
        "",
        LEGEND,
        "- **Robustness** (lower is better, probe-only): % of attack images in which the probe sees the target: "
        "RECE's closed-form regenerating embedding, and a white-box soft-prompt attack "
        f"({soft.get('tokens', '?')} input embeddings, {soft.get('steps', '?')} Adam steps).",
        "",
        "Every cell preserves the other concepts of the target's kind (`--config.preserve`); Concept Ablation and "
        "DoCo take the first of them as their anchor (circle -> square, red -> green, box -> circle), TRCE maps onto "
        "the generic word (shape / colour) unless its setting names a guide (`--config.anchor=@other`: the next "
        "concept of the kind, as the closed forms' presets do).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|---|" + "---:|" * (len(COLUMNS) - 3) + "---|",
    ]
    lines += baseline_rows(results)
    lines += [row(m, t, r, (seeds or {}).get((m, t))) for (m, t), r in results.items()]
    lines += goal_lines(results, seeds)
    measured = {m for m, _ in results}
    missing = [m for m in registry.methods() if m not in measured]
    if missing:
        lines += [
            "",
            f"Not in this table: {', '.join(missing)} (`python tools/erasure_scorecard.py --methods "
            f"{','.join(missing)}`).",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from jaxdiff import fileio

    known = list(registry.methods())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(known), help="comma-separated (default: all)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated shapes concepts")
    p.add_argument(
        "--workdir", default="runs/scorecard", help="one folder per cell; finished cells of the same key are reused"
    )
    p.add_argument("--num-images", type=int, default=128, help="images per prompt set (config.eval.num_images)")
    p.add_argument("--out", default="docs/erasure_scorecard.md")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    p.add_argument(
        "--settings",
        default="",
        help="the JSON tools/erasure_sweep.py writes (docs/erasure_sweep.json; several, comma-separated): each "
        "method runs at the setting it selected on validation prompts",
    )
    p.add_argument(
        "--train-seeds",
        type=int,
        default=1,
        help="training seeds per cell of a method that trains (config.seed 0..N-1; closed forms run once)",
    )
    p.add_argument("extra", nargs="*", help="--config.KEY=VALUE overrides passed to every cell (after --)")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(known))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(known)}")
    if args.train_seeds < 1:
        p.error(f"--train-seeds {args.train_seeds}: at least 1")
    targets = [t for t in args.targets.split(",") if t]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    extra = [f"--config.eval.num_images={args.num_images}", *args.extra]
    revisions = {m: code_revision(m) for m in methods}
    selected = {}
    for path in filter(None, args.settings.split(",")):
        try:
            chosen = {m: r["overrides"] for m, r in json.loads(Path(path).read_text())["selected"].items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"--settings {path}: not a sweep's JSON ({e})")
        clash = sorted(set(chosen) & set(selected))
        if clash:
            p.error(f"--settings: {clash} selected in more than one file")
        selected.update(chosen)
    if selected:
        print("selected settings: " + "; ".join(f"{m} {' '.join(o) or '(preset)'}" for m, o in selected.items()))
    results = {}
    for target in targets:
        for method in methods:
            chosen = selected.get(method, [])
            results[(method, target)] = run_cell(
                method, target, workdir, args.timeout, [*chosen, *extra], revisions[method]
            )
    seeds = {}
    for target in targets:
        for method in methods:
            if args.train_seeds < 2 or registry.get(method).kind == "closed_form":
                continue
            chosen = selected.get(method, [])
            seeds[(method, target)] = [results[(method, target)]] + [
                run_cell(
                    method,
                    target,
                    workdir,
                    args.timeout,
                    [*chosen, *extra, f"--config.seed={k}"],
                    revisions[method],
                    name=cell_name(method, target, k),
                )
                for k in range(1, args.train_seeds)
            ]
    command = command_line("erasure_scorecard.py", argv)
    text = markdown(results, command, cell_seconds(workdir, results, args.train_seeds), revisions, seeds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(out, text)
    (out.with_suffix(".json")).write_text(
        json.dumps(
            {
                **{cell_name(m, t): r for (m, t), r in results.items()},
                **{cell_name(m, t, k): r for (m, t), runs in seeds.items() for k, r in enumerate(runs) if k},
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    print(text)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
