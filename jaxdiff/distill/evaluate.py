"""NFE vs quality on `shapes`: the teacher at its reference and few steps, the student at few steps, same seeds.

Per sampler row: UNet evaluations per image (a CFG step counts 2), probe FD against renders of the prompts' own
scenes with a 95 % bootstrap interval (`metrics.evaluate.frechet_with_interval`), probe shape/colour accuracy, the
pixel judge's valid rate (one clean object; 95 % Wilson interval) and the probe's validity head when it has one.
The floor row is FD between two render sets of other scenes (what FD reads for perfect images at this n).
"""

from __future__ import annotations

import numpy as np

from jaxdiff.distill import rectified_flow as rf

TEACHER_SCHEDULER = "ddim"


def _metrics(images, real_feats, scenes, probe, boots: int, seed: int) -> dict:
    from jaxdiff.data import shapes as S
    from jaxdiff.erase import evaluate as ev
    from jaxdiff.metrics import pixel_judge
    from jaxdiff.metrics.evaluate import frechet_with_interval

    preds, feats = probe(images)
    fd, ci = frechet_with_interval(real_feats, np.asarray(feats, np.float64), boots=boots, seed=seed)
    acc = ev.scene_accuracy(preds, scenes)
    verdict = pixel_judge.judge(images, expected_objects=1, shapes=S.SHAPES, colours=S.COLOURS)
    out = {"n": len(images), "fd": fd, "fd_ci": ci, **acc, "valid": ev.rate(verdict["valid"])}
    if getattr(probe, "has_validity", False):
        out["probe_valid"] = ev.rate(probe.judge(images, expected_objects=1)["valid"])
    return out


def evaluate(config, pipe, student_params, grid_path, sample_student=None, student_label="Euler") -> dict:
    """{"eval": {...settings}, "rows": [...]} and the before/after grid at `grid_path`. `sample_student(pipe, params,
    prompts, latents, steps)` (default: the flow student's uniform Euler) makes the student rows."""
    from jaxdiff.data import shapes as S
    from jaxdiff.erase import evaluate as ev
    from jaxdiff.erase.job import probe as load_probe
    from jaxdiff.images import labeled_rows, save_png

    sample_student = rf.sample if sample_student is None else sample_student

    e = config.eval
    n, seed, boots = int(e.num_images), int(e.seed), int(e.bootstraps)
    prompts, scenes = ev.captions(None, n, seed)
    real = np.stack([S.render(s) for s in scenes])
    c = pipe.unet.config
    latents = ev.noise(n, (int(c.get("sample_size", 64)),) * 2 + (int(c.get("in_channels", 4)),), seed)
    judge = load_probe()
    real_feats = np.asarray(judge(real)[1], np.float64)
    _, other = ev.captions(None, n, seed + 1)
    floor, floor_ci = _floor(judge, real_feats, other, boots, seed)
    g = float(e.teacher_guidance)
    rows, grid = [], []
    for steps in e.teacher_steps:
        images = pipe(prompts, steps=int(steps), guidance=g, scheduler=TEACHER_SCHEDULER, latents=latents)
        nfe = int(steps) * (2 if g > 1 else 1)
        rows.append(
            {
                "sampler": f"teacher DDIM {steps}",
                "steps": int(steps),
                "nfe": nfe,
                **_metrics(images, real_feats, scenes, judge, boots, seed),
            }
        )
        grid.append((f"teacher\nDDIM {steps}", images[:GRID]))
    for steps in e.student_steps:
        images = sample_student(pipe, student_params, prompts, latents, int(steps))
        rows.append(
            {
                "sampler": f"{config.method} {student_label} {steps}",
                "steps": int(steps),
                "nfe": int(steps),
                **_metrics(images, real_feats, scenes, judge, boots, seed),
            }
        )
        grid.append((f"{config.method}\n{student_label} {steps}", images[:GRID]))
    save_png(grid_path, labeled_rows(grid))
    return {
        "eval": {
            "num_images": n,
            "seed": seed,
            "teacher_guidance": g,
            "student_guidance": 1.0,
            "prompts": "shapes train-template captions of random single-object scenes (erase.evaluate.captions)",
            "fd_floor": floor,
            "fd_floor_ci": floor_ci,
        },
        "rows": rows,
    }


GRID = 8


def _floor(judge, real_feats, scenes, boots, seed):
    from jaxdiff.data import shapes as S
    from jaxdiff.metrics.evaluate import frechet_with_interval

    other = np.stack([S.render(s) for s in scenes])
    return frechet_with_interval(real_feats, np.asarray(judge(other)[1], np.float64), boots=boots, seed=seed)


def _ci(ci) -> str:
    return "" if not ci else f" ({ci[0]:.1f}–{ci[1]:.1f})"


def _rate(r) -> str:
    if not r or r.get("rate") is None:
        return "n/a"
    lo, hi = r["ci"]
    return f"{100 * r['rate']:.0f}% ({100 * lo:.0f}–{100 * hi:.0f})"


def table(report: dict) -> list[str]:
    lines = [
        "| sampler | UNet evals | n | probe FD (95 % CI) | shape acc | colour acc | valid (pixel judge) "
        "| valid (probe head) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['sampler']} | {r['nfe']} | {r['n']} | {r['fd']:.1f}{_ci(r['fd_ci'])} | "
            f"{100 * r['shape_acc']:.0f}% | {100 * r['colour_acc']:.0f}% | {_rate(r['valid'])} | "
            f"{_rate(r.get('probe_valid'))} |"
        )
    e = report["eval"]
    lines.append(
        f"| renders of other scenes (FD floor) | – | {e['num_images']} | {e['fd_floor']:.1f}"
        f"{_ci(e['fd_floor_ci'])} | | | | |"
    )
    return lines


def _pair_model(pairs: dict) -> str:
    """Whose ODE made the pairs: "the teacher's", or the init model's (`pairs.source="init"`)."""
    return f"`{pairs['model']}`'s" if pairs.get("source") == "init" else "the teacher's"


def markdown(report: dict) -> str:
    e, t, p = report["eval"], report["train"], report.get("pairs")
    data = (
        f"Pairs: {p['num_pairs']} from {_pair_model(p)} {p['scheduler']} {p['steps']} steps, "
        f"CFG {p['guidance']} (`{p['folder']}`)."
        if p
        else "Data-free (prompts only)."
    )
    grown = report.get("student")
    if grown:
        data += (
            f" Student: a deeper UNet, {grown['unet_params'] / 1e6:.2f} M params (teacher "
            f"{grown['teacher_unet_params'] / 1e6:.2f} M), transformer blocks per block "
            f"{grown['transformer_layers_per_block']}."
        )
    lines = [
        f"# {report['method']} from `{report['teacher']}` (init: {report['init']})",
        "",
        f"{data} Training: {t['steps']} steps in {t['seconds']:.0f} s (resumed from {t['resumed_from']}).",
        "",
        f"Teacher rows sample with CFG {e['teacher_guidance']}; student rows with "
        f"{'uniform Euler steps' if p else 'the one-step generator'}, no CFG. "
        f"Same {e['num_images']} prompts and seeds in every row.",
        "",
        *table(report),
        "",
        "Grid: before_after.png (first 8 prompts).",
    ]
    return "\n".join(lines) + "\n"
