#!/usr/bin/env python
"""The NFE-vs-quality table of every distillation method on `shapes`: train (resumable), then judge, one command.

  python tools/distill_table.py                      # train what is missing in runs/distill_table, then the table
  python tools/distill_table.py --only-table         # judge the runs that exist (missing ones are listed)
  python tools/distill_table.py --methods reflow instaflow --n 64 --out /tmp/dt

Training: every method's `configs/distill/<method>.py:shapes` preset with the budget below (`BUDGETS`), the
teacher's default guidance (2.0 for the shipped teacher) and one shared pair store (DDIM 25 steps). Each run goes
through `jaxdiff distill`, so a killed run resumes from its last checkpoint when this command is run again.

Judging: held-out-template prompts (tools/eval_shapes.py), the same prompts and starting noise in every row. Per
row: UNet evaluations per image (a CFG step counts 2), Fréchet distance on probe features against renders of the
prompted scenes (the real-vs-real floor printed beside it), shape/colour/position accuracy by the probe and by the
pixel judge, the pixel judge's invalid-image rate, within-prompt diversity relative to the 25-step teacher (mean
pairwise probe-feature distance over several seeds of the same prompt), milliseconds per image of the compiled
sampler (median of timed batches, same run), the training cost (CPU minutes, teacher UNet evaluations), and the
rate at which prompts naming the forget concept of SFD still show it. Writes table.md, table.json and grid.png
(teacher 25 steps vs every one-step student, same prompts and seeds) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
for p in (str(ROOT), str(ROOT / "tools")):
    if p not in sys.path:
        sys.path.insert(0, p)

import eval_shapes  # noqa: E402

GUIDANCE = 2.0  # the shipped teacher's default (jaxdiff/assets/shapes/sampling_defaults.json)


def _pairs(num_pairs: int, shard_size: int) -> list[str]:
    """The flags of a DDIM-25 pair store at the teacher's default guidance (the store's key checks its users agree)."""
    return [
        "--config.pairs.source=teacher",
        f"--config.pairs.num_pairs={num_pairs}",
        f"--config.pairs.shard_size={shard_size}",
        "--config.pairs.scheduler=ddim",
        "--config.pairs.steps=25",
        f"--config.pairs.guidance={GUIDANCE}",
    ]


PAIRS = _pairs(1024, 64)  # one store for every method of the table budgets that learns from teacher pairs
# The longer rectified-flow budget: 8x the pairs over 5x the prompts, 4x the steps, an EMA of the student.
PAIRS_LONG = ["--config.data.num_prompts=2000", *_pairs(8192, 256)]
# InstaFlow as the paper distills: pairs from the 2-rectified flow's own ODE (16 uniform Euler steps, no CFG: the shapes
# 2-RF has no unconditional branch), as many as the teacher's long store, over the same prompts.
PAIRS_2RF = [
    "--config.data.num_prompts=2000",
    "--config.pairs.source=init",
    "--config.pairs.num_pairs=8192",
    "--config.pairs.shard_size=256",
    "--config.pairs.scheduler=rf_euler",
    "--config.pairs.steps=16",
    "--config.pairs.guidance=1.0",
]
LONG = ["--config.train.ema_decay=0.999", "--config.train.checkpoint_every=500"]
# 4x the long store's pairs over 4x its prompts, from a cheaper solver of the same ODE: DPM-Solver++(2M) at 4 steps
# keeps the teacher's accuracy (its table row) at 8 UNet calls per pair instead of DDIM-25's 50. The InstaFlow student
# of the 8192-pair store memorises it (image MSE to the teacher 0.0004 on its own pairs, 0.017 on fresh noise).
PAIRS_32K = [
    "--config.data.num_prompts=8192",
    "--config.pairs.source=teacher",
    "--config.pairs.num_pairs=32768",
    "--config.pairs.shard_size=256",
    "--config.pairs.scheduler=dpm++2m",
    "--config.pairs.steps=4",
    f"--config.pairs.guidance={GUIDANCE}",
]
# InstaFlow's perceptual stage on shapes (the paper's LPIPS stage): the features of a second probe, trained like
# the judge but from another seed on 20k freshly rendered examples, so that the judging probe never enters training.
PERCEPTUAL_PROBE = "perceptual_probe"
PERCEPTUAL_PROBE_SEED = 1
SMALL_EVAL = ["--config.eval.num_images=16", "--config.eval.bootstraps=0"]  # the run's own report; this tool judges


@dataclasses.dataclass(frozen=True)
class Method:
    name: str  # the run folder under --runs and the row label
    config: str  # configs/distill/<file>:<variants>
    flags: tuple[str, ...]  # the training budget and guidance
    steps: tuple[int, ...]  # the student's step counts in the table
    sampler: str  # "flow": uniform Euler on the velocity student; "pipeline": OUT/model's own scheduler
    teacher_evals_per_sample: int  # teacher UNet evaluations per training sample and step (CFG counts 2)
    after: str = ""  # a run whose OUT/model is the init
    pairs: str = "pairs"  # the pair store's folder under --runs (one per store key: prompts, shard size)
    perceptual_probe: bool = False  # distills through PERCEPTUAL_PROBE's features (trained first if missing)


BUDGETS = (
    Method("reflow", "reflow.py:shapes", ("--config.train.steps=2000", *PAIRS), (1, 2, 4), "flow", 0),
    Method(
        "instaflow",
        "instaflow.py:shapes",
        ("--config.train.steps=1000", *PAIRS),
        (1,),
        "flow",
        0,
        after="reflow",
    ),
    Method(
        "dmd2",
        "dmd2.py:shapes",
        ("--config.train.steps=1000", f"--config.dmd2.real_guidance={GUIDANCE}"),
        (1,),
        "pipeline",
        2,
    ),
    Method(
        "sid",
        "sid.py:shapes",
        ("--config.train.steps=1000", f"--config.sid.cfg_eval_real={GUIDANCE}"),
        (1,),
        "pipeline",
        2,
    ),
    Method(
        "lcm",
        "lcm.py:shapes",
        (
            "--config.train.steps=1000",
            "--config.lcm.time_cond_proj_dim=256",  # the w-embedding student, sampled at s = w + 1 = 2 (no CFG)
            "--config.lcm.w_min=0.5",
            "--config.lcm.w_max=1.5",
            *PAIRS,
        ),
        (1, 2, 4),
        "pipeline",
        2,
    ),
    Method(
        "scm",
        "scm.py:shapes",
        ("--config.train.steps=600", f"--config.scm.guidance={GUIDANCE}", *PAIRS),
        (1, 2),
        "pipeline",
        2,
    ),
    Method(
        "rcm",
        "scm.py:shapes,rcm",
        (
            "--config.train.steps=400",
            f"--config.scm.guidance={GUIDANCE}",
            f"--config.dmd2.real_guidance={GUIDANCE}",
            *PAIRS,
        ),
        (1, 2),
        "pipeline",
        4,
    ),
    Method(
        "sfd",
        "sid.py:shapes,sfd",
        ("--config.train.steps=1000", f"--config.sid.cfg_eval_real={GUIDANCE}"),
        (1,),
        "pipeline",
        2,
    ),
    Method(
        "dmd2_4step",
        "dmd2.py:shapes,4step",
        ("--config.train.steps=250", f"--config.dmd2.real_guidance={GUIDANCE}"),
        (4, 1),
        "pipeline",
        2,
    ),
)
LONG_BUDGETS = (
    Method(
        "reflow_long",
        "reflow.py:shapes",
        ("--config.train.steps=8000", *LONG, *PAIRS_LONG),
        (1, 2, 4),
        "flow",
        0,
        pairs="pairs_8192",
    ),
    Method(
        "instaflow_long",
        "instaflow.py:shapes",
        ("--config.train.steps=4000", *LONG, *PAIRS_LONG),
        (1,),
        "flow",
        0,
        after="reflow_long",
        pairs="pairs_8192",
    ),
    # InstaFlow's second stage from instaflow_long: the perceptual probe's feature distance plus L2 as an anchor.
    # The feature distance runs 10-18x the latent L2 between the teacher's DDIM 2/4/8 and 25-step latents (shard 0 of
    # the pair store, not the table's prompts): l2_weight 4 leaves it 2.5-4.5x the L2 term.
    Method(
        "instaflow_long_perceptual",
        "instaflow.py:shapes,probe",
        (
            "--config.train.steps=2000",
            "--config.rectified_flow.l2_weight=4.0",
            "--config.rectified_flow.perceptual_weight=1.0",
            *LONG,
            *PAIRS_LONG,
        ),
        (1,),
        "flow",
        0,
        after="instaflow_long",
        pairs="pairs_8192",
        perceptual_probe=True,
    ),
    Method(  # InstaFlow's distillation of the 2-RF's own coupling (the paper's), instaflow_long's budget otherwise
        "instaflow_2rf",
        "instaflow.py:shapes",
        ("--config.train.steps=4000", *LONG, *PAIRS_2RF),
        (1,),
        "flow",
        0,
        after="reflow_long",
        pairs="pairs_2rf_8192",
    ),
    # DMD (regression + distribution matching) on the InstaFlow student: the one-step flow generator keeps DMD's
    # regression on the long teacher pair store (weight 0.25) and gains the DM gradient of the teacher (CFG 2.0)
    # against a fake score that starts as a copy of the teacher (5 fake updates per generator step).
    Method(
        "instaflow_dmd",
        "dmd2.py:shapes,dmd",
        ("--config.train.steps=1000", f"--config.dmd2.real_guidance={GUIDANCE}", *PAIRS_LONG),
        (1,),
        "flow",
        2,
        after="instaflow_long",
        pairs="pairs_8192",
    ),
    # The InstaFlow student refined adversarially: DMD's regression on the long teacher pair store (weight 1) plus the
    # GAN head (generator weight 0.05) against renders of the prompts' scenes, no distribution matching: the
    # generator phase calls no teacher.
    Method(
        "instaflow_adv",
        "dmd2.py:shapes,dmd,adv",
        ("--config.train.steps=1000", *PAIRS_LONG),
        (1,),
        "flow",
        0,
        after="instaflow_long",
        pairs="pairs_8192",
    ),
    # instaflow_adv with LADD's real data: the discriminator's real samples are the teacher's latents of the long pair
    # store (each with its own prompt), the generator's GAN weight 0.005 (a tenth of instaflow_adv's).
    Method(
        "instaflow_ladd",
        "dmd2.py:shapes,dmd,adv,ladd",
        ("--config.train.steps=1000", *PAIRS_LONG),
        (1,),
        "flow",
        0,
        after="instaflow_long",
        pairs="pairs_8192",
    ),
    Method(  # InstaFlow's distillation continued from instaflow_long on 4x the pairs (PAIRS_32K), 4x the prompts
        "instaflow_32k",
        "instaflow.py:shapes",
        ("--config.train.steps=4000", *LONG, *PAIRS_32K),
        (1,),
        "flow",
        0,
        after="instaflow_long",
        pairs="pairs_dpm4_32768",
    ),
    Method(  # instaflow_32k continued for 8000 more steps on the same store (its loss had not reached the 8192 run's)
        "instaflow_32k_more",
        "instaflow.py:shapes",
        ("--config.train.steps=8000", *LONG, *PAIRS_32K),
        (1,),
        "flow",
        0,
        after="instaflow_32k",
        pairs="pairs_dpm4_32768",
    ),
    # A larger one-step student (InstaFlow-1.7B's remedy, jaxdiff/distill/grow.py): instaflow_long grown to two
    # transformer blocks per Transformer2DModel (6.9 M UNet params against 5.0 M; the added blocks start at zero
    # output), then instaflow_32k's recipe; 3000 steps keep it inside the 45-minute budget at ~1.6x the step cost.
    Method(
        "instaflow_deep",
        "instaflow.py:shapes,deep",
        ("--config.train.steps=3000", *LONG, *PAIRS_32K),
        (1,),
        "flow",
        0,
        after="instaflow_long",
        pairs="pairs_dpm4_32768",
    ),
    Method(  # InstaFlow's distillation continued for 4000 more steps from instaflow_long (fresh optimiser state)
        "instaflow_long_more",
        "instaflow.py:shapes",
        ("--config.train.steps=4000", *LONG, *PAIRS_LONG),
        (1,),
        "flow",
        0,
        after="instaflow_long",
        pairs="pairs_8192",
    ),
)
BY_NAME = {m.name: m for m in BUDGETS + LONG_BUDGETS}
FORGET = "circle"  # SFD's forget concept in configs/distill/sid.py:sfd


def train_command(m: Method, runs: Path) -> list[str]:
    flags = list(m.flags) + SMALL_EVAL
    if any(f.startswith("--config.pairs.") for f in flags):
        flags.append(f"--config.pairs.folder={runs / m.pairs}")
    if m.after:
        flags.append(f"--config.init={runs / m.after / 'model'}")
    if m.perceptual_probe:
        flags.append(f"--config.rectified_flow.probe={perceptual_probe_path(runs)}")
    return [sys.executable, "-m", "jaxdiff.cli", "distill", "--config", f"configs/distill/{m.config}", *flags]


def perceptual_probe_path(runs: Path) -> Path:
    return runs / PERCEPTUAL_PROBE / "assets" / "shapes_probe"


def perceptual_probe_command(runs: Path) -> list[str]:
    """tools/train_shapes.py's probe stage (the judge's recipe) from PERCEPTUAL_PROBE_SEED, on rendered examples."""
    work = runs / PERCEPTUAL_PROBE
    return [
        *(sys.executable, "tools/train_shapes.py", "--stage", "probe", "--workdir", str(work)),
        *("--assets", str(work / "assets"), "--seed", str(PERCEPTUAL_PROBE_SEED)),
        *("--generate-data", "--num-examples", "20000"),
    ]


def train(methods: list[Method], runs: Path) -> None:
    for m in methods:
        out = runs / m.name
        if (out / "report.json").exists():
            print(f"[{m.name}] trained ({out}/report.json)", flush=True)
            continue
        if m.perceptual_probe and not (runs / PERCEPTUAL_PROBE / "probe" / "done.json").exists():
            cmd = perceptual_probe_command(runs)
            print(f"[{PERCEPTUAL_PROBE}] {' '.join(cmd[1:])}", flush=True)
            t = time.time()
            rc = _run_forwarding_sigterm(cmd)
            _add_seconds(runs, m.name, time.time() - t)
            if rc != 0:
                raise SystemExit(f"[{PERCEPTUAL_PROBE}] train_shapes.py exited {rc}; rerun this command to resume")
        cmd = train_command(m, runs) + ["--out", str(out)]
        print(f"[{m.name}] {' '.join(cmd[2:])}", flush=True)
        t = time.time()
        rc = _run_forwarding_sigterm(cmd)
        _add_seconds(runs, m.name, time.time() - t)  # every attempt counts: a resumed run reports its whole cost
        if rc != 0:
            raise SystemExit(f"[{m.name}] jaxdiff distill exited {rc}; rerun this command to resume")
        print(f"[{m.name}] done in {time.time() - t:.0f} s", flush=True)


def _run_forwarding_sigterm(cmd: list[str]) -> int:
    """Run `cmd`; a SIGTERM or Ctrl-C here is passed on to it (the runner checkpoints and exits), then awaited."""
    child = subprocess.Popen(cmd, cwd=ROOT)

    def forward(signum, frame):
        child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cost_path(runs: Path, name: str) -> Path:
    """Wall seconds of every `jaxdiff distill` attempt of a run (pairs, training, its report); kept beside the run
    folder, which the runner must find empty or its own."""
    return runs / "costs" / f"{name}.json"


def _add_seconds(runs: Path, name: str, seconds: float) -> None:
    from jaxdiff import fileio

    path = cost_path(runs, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    cost = json.loads(path.read_text()) if path.exists() else {"seconds": 0.0, "attempts": 0}
    cost = {"seconds": cost["seconds"] + seconds, "attempts": cost["attempts"] + 1}
    fileio.atomic_write_text(path, json.dumps(cost) + "\n")


# ------------------------------------------------------------------------------------------------ judging

TEACHER_ROWS = (
    ("ddim", 50),
    ("ddim", 25),
    ("ddim", 8),
    ("ddim", 4),
    ("ddim", 1),
    ("dpm++2m", 25),
    ("dpm++2m", 8),
    ("dpm++2m", 4),
)
BATCH = 100  # images per compiled sampling call (one compile per row)
DIVERSITY = (20, 5)  # prompts x seeds for the within-prompt diversity


@dataclasses.dataclass
class Row:
    label: str
    method: str
    steps: int
    nfe: int
    sample: object  # (prompts, latents, seed) -> images [B, H, W, 3]
    run: Path | None = None


def rows_for(methods: list[Method], runs: Path, pipe) -> tuple[list[Row], list[str]]:
    """The teacher's rows and every trained student's; and the methods with no finished run."""
    from jaxdiff.distill import rectified_flow as rf
    from jaxdiff.sampling.pipeline import load_pipeline

    def teacher(scheduler, steps):
        return lambda pr, z, seed: pipe(pr, steps=steps, guidance=GUIDANCE, scheduler=scheduler, latents=z, seed=seed)

    rows = [Row(f"teacher {sch.upper()} {k}", "teacher", k, 2 * k, teacher(sch, k)) for sch, k in TEACHER_ROWS]
    missing = []
    for m in methods:
        out = runs / m.name
        if not (out / "report.json").exists():
            missing.append(m.name)
            continue
        student = load_pipeline(out / "model")
        for k in m.steps:
            if m.sampler == "flow":
                fn = (lambda st, k: lambda pr, z, seed: rf.sample(st, st.unet.params, pr, z, k))(student, k)
            else:  # the guidance the student's pipeline names (a w-embedding LCM's; 1.0 = none)
                g = _student_guidance(out / "model")
                fn = (lambda st, k, g: lambda pr, z, seed: st(pr, steps=k, guidance=g, latents=z, seed=seed))(
                    student, k, g
                )
            rows.append(Row(f"{m.name} {k}", m.name, k, k, fn, out))
    return rows, missing


def _student_guidance(model: Path) -> float:
    path = model / "sampling_defaults.json"
    return float(json.loads(path.read_text()).get("guidance", 1.0)) if path.exists() else 1.0


def _batched(fn, prompts, latents, seed, times: list, warm: bool):
    """fn over fixed-size batches (the last padded: one compiled shape); the wall time of every batch after the
    first call of the row (which compiles) appended to `times`."""
    out = []
    for b, start in enumerate(range(0, len(prompts), BATCH)):
        pr, z = list(prompts[start : start + BATCH]), latents[start : start + BATCH]
        pad = BATCH - len(pr)
        t = time.perf_counter()
        images = np.asarray(fn(pr + [pr[-1]] * pad, np.concatenate([z, z[:1].repeat(pad, 0)]), seed + b))
        if warm or b > 0:
            times.append(time.perf_counter() - t)
        out.append(images[: len(pr)])
    return np.concatenate(out)


def _diversity(probe, images: np.ndarray, seeds: int) -> float:
    """Mean pairwise distance of probe features between images of the same prompt (rows grouped by prompt)."""
    _, feats = probe(images)
    f = np.asarray(feats, np.float64).reshape(-1, seeds, feats.shape[-1])
    d = np.linalg.norm(f[:, :, None] - f[:, None, :], axis=-1)
    return float(d.sum() / (f.shape[0] * seeds * (seeds - 1)))


def judge(rows: list[Row], n: int, seed: int, boots: int, pipe) -> dict:
    from jaxdiff.data import shapes as S
    from jaxdiff.erase import evaluate as ev
    from jaxdiff.metrics import frechet
    from jaxdiff.metrics import probe as probe_lib
    from jaxdiff.metrics.evaluate import frechet_with_interval

    probe = probe_lib.load_probe()
    prompts, scenes = eval_shapes.heldout_prompts(n, 1, seed)
    _, real_feats = probe(eval_shapes.real_renders(scenes))
    real_feats = np.asarray(real_feats, np.float64)
    _, again = probe(eval_shapes.real_renders(eval_shapes.rejittered(scenes, seed)))
    floor = frechet.frechet_distance_from_features(np.asarray(again, np.float64), real_feats)
    c = pipe.unet.config
    shape = (int(c.get("sample_size", 64)),) * 2 + (int(c.get("in_channels", 4)),)
    latents = ev.noise(n, shape, seed)
    k, s = min(DIVERSITY[0], n), DIVERSITY[1]
    div_prompts = [p for p in prompts[:k] for _ in range(s)]
    div_latents = ev.noise(k * s, shape, seed + 1)
    forget = np.asarray([sc.objects[0].shape == FORGET for sc in scenes])
    results, grid = [], []
    for row in rows:
        t0, times = time.perf_counter(), []
        images = _batched(row.sample, prompts, latents, seed, times, warm=False)
        div_images = _batched(row.sample, div_prompts, div_latents, seed + 50, times, warm=True)
        r = eval_shapes.judge(probe, images, scenes, prompts, real_feats)
        preds, feats = probe(images)
        r["fd"], r["fd_ci"] = frechet_with_interval(real_feats, np.asarray(feats, np.float64), boots=boots, seed=seed)
        r["forget_rate"] = float(np.mean(preds["shape0"][forget] == S.SHAPES.index(FORGET)))
        r["forget_n"] = int(forget.sum())
        r["diversity"] = _diversity(probe, div_images, s)
        r["ms_per_image"] = 1000 * float(np.median(times)) / BATCH if times else float("nan")
        r.update(label=row.label, method=row.method, steps=row.steps, nfe=row.nfe, seconds=time.perf_counter() - t0)
        if row.run is not None:
            r["train"] = _train_cost(row.run)
        results.append(r)
        print(
            f"{row.label}: FD {r['fd']:.1f}, shape {r['shape_acc']:.3f}/{r['pixel_shape_acc']:.3f}, "
            f"valid {r['pixel_valid']:.3f}, {r['ms_per_image']:.2f} ms/img ({r['seconds']:.0f} s)",
            flush=True,
        )
        if row.method == "teacher" and row.steps == 25 or row.method != "teacher" and row.steps == 1:
            grid.append((row.label.replace(" ", "\n", 1), images[:GRID]))
    base = next(r for r in results if r["method"] == "teacher" and r["steps"] == 25 and "DDIM" in r["label"])
    for r in results:
        r["diversity_rel"] = r["diversity"] / base["diversity"]
    return {
        "n": n,
        "seed": seed,
        "bootstraps": boots,
        "fd_floor": floor,
        "guidance": GUIDANCE,
        "rows": results,
        "grid": grid,
        "diversity_set": {"prompts": k, "seeds": s},
    }


GRID = 8


def _train_cost(run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    config = json.loads((run / "config.json").read_text())
    cost_file = cost_path(run.parent, run.name)
    cost = json.loads(cost_file.read_text()) if cost_file.exists() else {}
    m = BY_NAME[run.name]
    steps, batch = int(config["train"]["steps"]), int(config["train"]["batch_size"])
    pairs = report.get("pairs") or {}
    return {
        "steps": steps,
        "batch_size": batch,
        "minutes": cost.get("seconds", float("nan")) / 60,
        "teacher_evals": steps * batch * m.teacher_evals_per_sample,
        "uses_pairs": bool(pairs),
        "init": report.get("init", "teacher"),
    }


def _pct(rate: float, n: int) -> str:
    return eval_shapes._cell(rate, n)


def markdown(table: dict, missing: list[str], runs: Path, command: str) -> str:
    n = table["n"]
    rows = table["rows"]
    base = next(r for r in rows if r["label"] == "teacher DDIM 25")
    lines = [
        "# Distillation on `shapes`: UNet evaluations vs quality",
        "",
        f"Regenerate: `{command}` (trains what is missing in `{runs}`, resumable; then judges). Code revision "
        f"`{table['revision']}`{' (uncommitted changes)' if table['dirty'] else ''}; every row judged in this run.",
        "",
        f"N = {n} prompts from the held-out templates (one object each), the same prompts and starting noise in "
        f"every row; rates with 95 % Wilson intervals, FD with a 95 % bootstrap interval ({table['bootstraps']} "
        f"resamples). Teacher rows use CFG {table['guidance']} (its default); students sample without CFG "
        "(LCM's w-embedding student gets its guidance through the embedding: one UNet call per step). "
        f"FD floor (real renders vs the same scenes re-rendered): {table['fd_floor']:.1f}.",
        "",
        "| sampler | UNet evals | probe FD (95 % CI) | shape: probe / pixel | colour: probe / pixel | position "
        "(probe) | invalid (pixel judge) | diversity vs teacher | ms / image | training |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ci = f" ({r['fd_ci'][0]:.1f}–{r['fd_ci'][1]:.1f})" if r.get("fd_ci") else ""
        t = r.get("train")
        train = (
            f"{t['steps']} steps × {t['batch_size']}, {t['minutes']:.0f} min, "
            f"{t['teacher_evals'] / 1e3:.0f}k teacher evals"
            + (" + pairs" if t["uses_pairs"] else "")
            + (f" (init: {Path(str(t['init'])).parent.name})" if str(t["init"]) != "teacher" else "")
            if t
            else "–"
        )
        pos = r.get("position_acc_when_stated")
        lines.append(
            f"| {r['label']} | {r['nfe']} | {r['fd']:.1f}{ci} | {100 * r['shape_acc']:.1f} / "
            f"{100 * r['pixel_shape_acc']:.1f} % | {100 * r['colour_acc']:.1f} / {100 * r['pixel_colour_acc']:.1f} % | "
            f"{'n/a' if pos is None else f'{100 * pos:.0f} %'} | {_pct(1 - r['pixel_valid'], n)} | "
            f"{r['diversity_rel']:.2f} | {r['ms_per_image']:.2f} | {train} |"
        )
    lines += ["", "## Against the goal", ""]
    lines.append(
        f"Goal: a one-step student within 1.5× the 25-step teacher's FD ({1.5 * base['fd']:.1f}) and within 3 points "
        f"of its accuracies (shape {100 * base['shape_acc']:.1f} / {100 * base['pixel_shape_acc']:.1f} %, colour "
        f"{100 * base['colour_acc']:.1f} / {100 * base['pixel_colour_acc']:.1f} %, probe / pixel judge)."
    )
    lines.append("")
    for r in rows:
        if r["method"] == "teacher" or r["steps"] != 1:
            continue
        gaps = {
            "FD": r["fd"] <= 1.5 * base["fd"],
            "shape": all(base[k] - r[k] <= 0.03 for k in ("shape_acc", "pixel_shape_acc")),
            "colour": all(base[k] - r[k] <= 0.03 for k in ("colour_acc", "pixel_colour_acc")),
        }
        verdict = "meets it" if all(gaps.values()) else "misses on " + ", ".join(k for k, ok in gaps.items() if not ok)
        lines.append(f"- {r['label']}: FD {r['fd']:.1f} ({r['fd'] / base['fd']:.1f}× the teacher's); {verdict}.")
    sfd = [r for r in rows if r["method"] in ("sfd", "sid", "teacher") and r["steps"] in (1, 25)]
    if any(r["method"] == "sfd" for r in sfd):
        lines += [
            "",
            f"## Forgetting ({FORGET!r}, SFD)",
            "",
            f"Prompts naming a {FORGET} whose image shows one (probe), n = {rows[0]['forget_n']}:",
            "",
        ]
        for r in sfd:
            lines.append(f"- {r['label']}: {_pct(r['forget_rate'], r['forget_n'])}")
    if missing:
        lines += ["", "Not trained yet (no row): " + ", ".join(missing) + "."]
    lines += [
        "",
        "Columns: UNet evals per image (a CFG step counts 2); shape / colour: accuracy by the learned probe and by "
        "the non-learned pixel judge (an invalid image is wrong); position: over prompts that state one; invalid: "
        "the pixel judge finds no clean single object; diversity: mean pairwise probe-feature distance between "
        f"{table['diversity_set']['seeds']} seeds of each of {table['diversity_set']['prompts']} prompts, relative to "
        "teacher DDIM 25; ms / image: median wall time of a compiled batch of "
        f"{BATCH} on this machine's CPU, divided by {BATCH}; training: steps × batch, wall minutes of `jaxdiff "
        "distill` on 2 CPU cores (every attempt, pair making included), teacher UNet evaluations during training "
        "(a store of N DDIM-25 pairs with CFG costs 50·N more: 1024 pairs shared by the table budgets, 8192 by the "
        "_long runs).",
        "",
        "Grid: grid.png, teacher DDIM 25 and every one-step student on the first 8 prompts, same noise.",
    ]
    return "\n".join(lines) + "\n"


def _revision() -> tuple[str, bool]:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/distill_table", help="where the training runs live (resumable)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=[m.name for m in BUDGETS],
        choices=list(BY_NAME),
        help="default: every method at its table budget; reflow_long and instaflow_long train 4x longer on 8x the "
        "pairs, instaflow_long_more continues instaflow_long, instaflow_long_perceptual adds InstaFlow's perceptual "
        "stage to it (a second probe's features; it is trained first), instaflow_2rf distills reflow_long's own "
        "ODE (InstaFlow's pairs) instead of the teacher's, instaflow_dmd refines instaflow_long with DMD "
        "(regression on the teacher's pairs + distribution matching), instaflow_32k(_more) continue instaflow_long "
        "on 4x the pairs, instaflow_deep does so with a larger student (two transformer blocks per transformer), "
        "instaflow_adv and instaflow_ladd refine instaflow_long with regression + a GAN head (real samples: renders, "
        "or the teacher's pair latents)",
    )
    p.add_argument("--only-table", action="store_true", help="judge the existing runs; train nothing")
    p.add_argument("--only-train", action="store_true", help="train what is missing; no table")
    p.add_argument("--n", type=int, default=200, help="prompts per row")
    p.add_argument("--seed", type=int, default=0, help="the held-out prompts' and noise seed")
    p.add_argument("--bootstraps", type=int, default=200, help="resamples of the FD interval (0: none)")
    p.add_argument("--out", default="docs/distill_table", help="table.md, table.json, grid.png")
    args = p.parse_args(argv)
    runs = Path(args.runs)
    methods = [BY_NAME[n] for n in args.methods]
    if not args.only_table:
        train(methods, runs)
    if args.only_train:
        return 0
    from jaxdiff import fileio
    from jaxdiff.images import labeled_rows, save_png
    from jaxdiff.sampling.pipeline import load_pipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("shapes")
    rows, missing = rows_for(methods, runs, pipe)
    table = judge(rows, args.n, args.seed, args.bootstraps, pipe)
    table["revision"], table["dirty"] = _revision()
    save_png(out / "grid.png", labeled_rows(table.pop("grid")))
    command = " ".join(["python tools/distill_table.py", *(sys.argv[1:] if argv is None else argv)])
    fileio.atomic_write_text(out / "table.json", json.dumps(table, indent=2, default=float) + "\n")
    fileio.atomic_write_text(out / "table.md", markdown(table, missing, runs, command))
    print((out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
