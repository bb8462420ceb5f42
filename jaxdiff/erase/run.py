"""`jaxdiff erase`: one erasure method from its config on a pipeline; writes the edited model, a grid and a report.

    erase(config, out) -> report dict

Output folder:
  model/            the edited pipeline (jaxdiff checkpoint; `jaxdiff export out/model DST` gives a diffusers folder)
  adapter/          SPM only: the adapters (safetensors) and the Facilitated Transport settings
  before_after.png  rows of unedited / edited samples (same seeds) for the target word, its synonyms, held-out
                    templates and preserved concepts
  report.json, report.md   erasure / preservation figures from the shapes probe and pixel judge (built-in `shapes`
                    model; see evaluate.py), warnings, the edit's wall-clock time and peak memory, optionally attack
                    success rates; fine-tuning methods: the first and last logged losses and ‖Δθ‖

`summary(report)` is the one line `jaxdiff erase` prints (with the warnings, when a preserved accuracy fell).
  train/            fine-tuning methods: orbax checkpoints (a killed run resumes), metrics.jsonl, TensorBoard

Everything the run needs (config values, the concept, the model) is checked before the first write. `overwrite`
builds the new run in OUT.staging and swaps it in for OUT only once complete; a rerun after a kill resumes there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import jax
import ml_collections as mlc
import numpy as np

from jaxdiff import fileio
from jaxdiff.erase import evaluate as ev
from jaxdiff.erase import registry
from jaxdiff.erase.config import AUTO, default_preserve, split_list
from jaxdiff.erase.job import Job, Result, peak_rss_gb, probe
from jaxdiff.errors import UserError

# ---------------------------------------------------------------------------------------------- the command

GRID_SAMPLES = 6


def _saved_config(folder: Path) -> dict | None:
    """The config of the erase run in `folder`, None when it holds none (or an unreadable one)."""
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None


def staging_folder(out: Path) -> Path:
    """Where `--overwrite` builds the run that replaces OUT; it is swapped in once complete (a rerun resumes it)."""
    out = Path(os.path.abspath(out))  # "." and ".." have no name to add to
    return out.with_name(f"{out.name}.staging")


def _work_folder(out: Path, config: mlc.ConfigDict, overwrite: bool) -> Path:
    """Where this run writes, decided without writing anything: OUT when it is new, empty or holds an interrupted
    run of the same config (which then resumes); with `overwrite`, OUT.staging, so OUT stays whole until the new
    run is complete."""
    mine = json.loads(config.to_json_best_effort())
    if not out.exists() or (out.is_dir() and not any(out.iterdir())) or _saved_config(out) == mine:
        return out
    if not overwrite:
        what = "holds a run with a different config (see its config.json)"
        if _saved_config(out) is None:
            what = "exists and is not an erase output folder"
        raise FileExistsError(
            f"{out} {what}; use --overwrite (it is replaced once the new run is done) or another --out"
        )
    staging = staging_folder(out)
    if staging.is_dir() and any(staging.iterdir()) and _saved_config(staging) is None:
        raise FileExistsError(f"{staging} (where --overwrite builds the new {out}) holds something else; move it")
    return staging


def _start(work: Path, config: mlc.ConfigDict) -> None:
    """Record the config in the work folder; a staging folder left by a replacement run of another config goes."""
    text = config.to_json_best_effort(indent=2) + "\n"
    if work.exists() and _saved_config(work) not in (None, json.loads(text)):
        shutil.rmtree(work)  # only OUT.staging can get here: OUT itself is used only when new, empty or the same run
    work.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(work / "config.json", text)


def _validate(config: mlc.ConfigDict) -> None:
    """Config values the run would only trip over after the edit."""
    from jaxdiff.sampling.schedulers import DIFFUSERS_CLASSES, SCHEDULERS

    # registry.get: an unknown method is a UserError naming the known ones.
    method = registry.get(config.method)
    if method.needs_anchor and not str(config.anchor).strip():
        raise UserError(f"{config.method} needs an anchor concept (--config.anchor=...), e.g. square for circle")
    if not method.retention and float(config.get("train", {}).get("retain_weight", 0.0) or 0.0) != 0.0:
        from jaxdiff.erase.finetune import retention_refused

        raise retention_refused(config.method)
    scheduler = config.eval.scheduler
    if scheduler and scheduler not in SCHEDULERS and scheduler not in DIFFUSERS_CLASSES:
        raise UserError(f"config.eval.scheduler={scheduler!r} is unknown; choose from {', '.join(SCHEDULERS)}")
    if config.eval.split not in ("test", "validation"):
        raise UserError(f"config.eval.split={config.eval.split!r} is unknown; choose test or validation")
    if config.eval.split == "validation" and config.eval.attacks:
        raise UserError("the attacks run on the test prompts: drop --attacks with config.eval.split=validation")


def _resolved(config: mlc.ConfigDict) -> mlc.ConfigDict:
    """The config the method runs with: `preserve=auto` replaced by the model's world (`default_preserve`); the
    saved config.json keeps "auto", so a rerun of the same command resumes."""
    if str(config.preserve).strip().lower() != AUTO:
        return config
    from jaxdiff.sampling.pipeline import BUILTIN

    is_shapes = str(config.model) == "shapes" or Path(str(config.model)).resolve() == BUILTIN["shapes"]
    resolved = config.copy_and_resolve_references()
    resolved.preserve = ";".join(default_preserve(split_list(config.concept), is_shapes))
    return resolved


def _save_outputs(job: Job, result: Result) -> None:
    from jaxdiff.convert import checkpoint
    from jaxdiff.convert.safetensors_io import write_safetensors

    models = {
        "unet": dataclasses.replace(job.pipe.unet, params=result.unet_params),
        "vae": job.pipe.vae,
        "text_encoder": job.pipe.text_encoders[0],
    }
    checkpoint.save_pipeline(job.pipe.path, job.out / "model", models, overwrite=True)
    if result.adapters is not None:
        with checkpoint.atomic_directory(job.out / "adapter", overwrite=True) as tmp:
            flat = {
                f"{name}/{k}": np.asarray(v, np.float32) for name, a in result.adapters.items() for k, v in a.items()
            }
            write_safetensors(tmp / "adapters.safetensors", flat, metadata={"format": "jaxdiff-spm"})
            (tmp / "spm.json").write_text(json.dumps(result.adapter_meta, indent=2) + "\n")


def _noise_seed(e: mlc.ConfigDict) -> int:
    """The seed of the evaluation's noise: the validation split samples other seeds than the test split."""
    return int(e.seed) + (ev.VALIDATION_SEED_OFFSET if e.split == "validation" else 0)


def _sets(job: Job, concept: ev.Concept | None) -> dict[str, tuple[list[str], list]]:
    e = job.config.eval
    n = int(e.num_images)
    if concept is not None and e.split == "validation":
        test_n = int(e.test_num_images) or n
        test = ev.scoring_prompts(concept, test_n, int(e.seed), int(e.attack_images))
        return ev.validation_sets(concept, n, int(e.seed), test)
    if concept is not None:
        return ev.prompt_sets(concept, n, int(e.seed))
    # No probe for this model: the grid shows the config's prompts.
    syn = [t.format(s) for s in split_list(job.config.synonyms) for t in job.config.templates]
    return {
        "word": (job.concept_prompts[:n], []),
        "synonyms": (syn[:n], []),
        "preserved": (job.preserve_prompts[:n], []),
    }


def _attacks(job: Job, result: Result, concept: ev.Concept, probe) -> dict:
    """Attack success rates of RECE's regenerating embedding and the soft-prompt attack (fixed budgets)."""
    from jaxdiff.erase import attacks

    e = job.config.eval
    n = int(e.attack_images)
    prompts = ev.attack_captions(concept, n, int(e.seed))
    latents = ev.noise(n, job.latent_shape, int(e.seed) + 7)
    edited = result.unet_params
    out = {}
    t0 = time.perf_counter()
    adv = attacks.regenerating_embedding_attack(edited, job.original, job.context(prompts), reg=float(e.attack_reg))
    images = job.images(None, latents, edited, contexts=adv)
    out["regenerating_embedding"] = {
        "success": ev.attack_success(probe, concept, images),
        "n": n,
        "seconds": time.perf_counter() - t0,
        "reg": float(e.attack_reg),
    }
    t0 = time.perf_counter()
    target_latents = job.latents_of(job.images(prompts, latents))  # the original model's images
    contexts, info = attacks.soft_prompt_attack(
        job.pipe,
        edited,
        prompts,
        target_latents,
        num_tokens=int(e.attack_tokens),
        steps=int(e.attack_steps),
        learning_rate=float(e.attack_lr),
        seed=int(e.seed),
    )
    images = job.images(None, latents, edited, contexts=contexts)
    out["soft_prompt"] = {
        "success": ev.attack_success(probe, concept, images),
        "n": n,
        "seconds": time.perf_counter() - t0,
        "steps": int(e.attack_steps),
        "tokens": int(e.attack_tokens),
        "loss_first": float(info["loss_first"]),
        "loss_last": float(info["loss_last"]),
    }
    out["_images"] = images
    return out


def erase(config: mlc.ConfigDict, out: str | os.PathLike, *, progress: bool = True, overwrite: bool = False) -> dict:
    """Run the configured method; write model/, before_after.png, report.json and report.md to `out`."""
    from jaxdiff.images import labeled_rows, save_png

    out = Path(out)
    _validate(config)
    work = _work_folder(out, config, overwrite)
    job = Job(_resolved(config), work, progress)  # resolves the concept and loads the model: nothing is written before
    concept = job.concept
    created = not work.exists()
    _start(work, config)
    t0 = time.perf_counter()
    try:
        result = registry.get(config.method).module.run(job)
    except UserError:
        # A method option the method itself refuses (before any training step): leave nothing behind, so that the
        # corrected command is not refused as "a run with a different config".
        if [p.name for p in work.iterdir()] == ["config.json"]:
            (work / "config.json").unlink()
            if created:
                work.rmdir()
        raise
    jax.block_until_ready(result.unet_params)
    seconds = time.perf_counter() - t0
    peak = peak_rss_gb()
    _save_outputs(job, result)

    report = {
        "method": config.method,
        "concept": config.concept,
        "preserve": job.config.preserve,
        "preserve_default": str(config.preserve).strip().lower() == AUTO,
        "anchor": job.anchor,  # as resolved ("@other" -> the concept it names)
        "model": str(config.model),
        "split": str(config.eval.split),  # the prompts and seeds the figures rest on: test or validation
        "cost": {"seconds": seconds, "peak_rss_gb": peak},
        "info": _jsonable(result.info),
    }
    sets = _sets(job, concept)
    before, after, rows = {}, {}, []
    e = config.eval
    for i, (name, (prompts, _)) in enumerate(sets.items()):
        if not prompts:
            continue
        latents = ev.noise(len(prompts), job.latent_shape, _noise_seed(e) + i)
        before[name] = job.images(prompts, latents)
        after[name] = job.images(prompts, latents, result.unet_params, result.params_for_prompt)
        k = min(GRID_SAMPLES, len(prompts))
        rows += [(f"{name}\nbefore", before[name][:k]), (f"{name}\nafter ({config.method})", after[name][:k])]
    if concept is not None:
        judge = probe()
        prompts = sets["preserved"][0]
        floor = job.images(prompts, ev.noise(len(prompts), job.latent_shape, _noise_seed(e) + 1000))
        # The erasure floor: the unedited model on the word prompts with the word removed, same seeds ("a red
        # circle" -> "a red"; its prior fills the gap: in shapes, "a red" draws round blobs).
        without = None
        if job.concepts == [concept.word]:
            prompts = job.replaced(sets["word"][0], "")
            without = job.images(prompts, ev.noise(len(prompts), job.latent_shape, _noise_seed(e)))
        report.update(ev.evaluate(judge, concept, before, after, sets, floor, without, anchor=job.anchor))
        if e.attacks:
            attack = _attacks(job, result, concept, judge)
            rows.append(("soft-prompt\nattack", attack.pop("_images")[:GRID_SAMPLES]))
            report["robustness"] = attack
    report["prompts"] = {name: prompts[:4] for name, (prompts, _) in sets.items()}
    save_png(work / "before_after.png", labeled_rows(rows))
    fileio.atomic_write_text(work / "report.json", json.dumps(report, indent=2) + "\n")
    fileio.atomic_write_text(work / "report.md", markdown(report))
    if work != out:
        fileio.replace_directory(work, out)  # the old OUT goes only now, in one exchange
    return report


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.generic, jax.Array)) or hasattr(x, "item"):
        return np.asarray(x).item() if np.asarray(x).size == 1 else np.asarray(x).tolist()
    return x


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _r(r: dict | None) -> str:
    """A rate with its 95 % Wilson interval: "41.0% (33–49)"."""
    if not r or r.get("rate") is None:
        return "n/a"
    lo, hi = r["ci"]
    return f"{100 * r['rate']:.1f}% ({100 * lo:.0f}–{100 * hi:.0f})"


def _num(x, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def training(info: dict) -> str:
    """A fine-tuning run's movement: "loss 0.123 (step 1) -> 0.0456 (step 300), ‖Δθ‖ 0.0123"."""
    first, last = info.get("loss_initial", {}), info.get("loss_final", {})
    losses = [
        f"{k} {first[k]:.4g} (step {first['step']}) -> {last[k]:.4g} (step {last['step']})"
        for k in first
        if k != "step" and k in last
    ]
    return ", ".join([*losses, f"‖Δθ‖ {info['delta_norm']:.4g}"])


def summary(report: dict) -> str:
    """The one line `jaxdiff erase` prints: erasure (valid-only, probe-only), invalid share, preservation of both
    attributes, the joint score, and every warning."""
    line = f"{report['method']}: erased {report['concept']!r} in {report['cost']['seconds']:.1f} s"
    if "delta_norm" in report.get("info", {}):
        line += f"; trained {training(report['info'])}"
    word = (report.get("erasure") or {}).get("word")
    if not word:
        return line
    pct = lambda r: "n/a" if r["rate"] is None else f"{r['rate']:.0%}"  # noqa: E731
    line += (
        f"; erased (valid, both judges) {pct(word['erased']['before'])} -> {pct(word['erased']['after'])} of "
        f"{word['n']} images, invalid {pct(word['invalid']['before'])} -> {pct(word['invalid']['after'])}, "
        f"probe-only sees it {pct(word['probe_only']['before'])} -> {pct(word['probe_only']['after'])}"
    )
    scores = report.get("scores", {})
    if scores.get("normalised_erasure") is not None:
        line += f"; normalised {scores['normalised_erasure']:.2f}"
    pres = report["preservation"].get("preserved", {})
    if pres:
        parts = [f"{k} {pct(v['both']['before'])} -> {pct(v['both']['after'])}" for k, v in pres.items()]
        line += f"; other {report['kind']}s (both judges): " + ", ".join(parts)
    if scores.get("joint") is not None:
        line += f"; joint {scores['joint']:.2f}"
    drops = ev.worst_drops(report)
    if drops:
        worst = ", ".join(
            f"{k} {100 * b:.0f}% -> {100 * a:.0f}% ({j}; {where})" for k, (b, a, j, where) in drops.items()
        )
        line += f"; WARNING: preserved {' and '.join(drops)} fell more than {100 * ev.WARN_DROP:.0f} points: {worst}"
    if any(w.startswith("normalised erasure is unreliable") for w in report.get("warnings", [])):
        line += "; normalised erasure unreliable (floor near the unedited rate)"
    if report.get("warnings"):
        line += " (report.md lists every warning)"
    return line


def markdown(report: dict) -> str:
    """report.md: the figures of report.json as tables."""
    lines = [
        f"# {report['method']}: erase `{report['concept']}`"
        + (f" (the {report['resolved']})" if report.get("resolved", report["concept"]) != report["concept"] else "")
        + f" from `{report['model']}`",
        "",
        f"Edit: {report['cost']['seconds']:.1f} s wall-clock, peak memory {report['cost']['peak_rss_gb']:.2f} GiB "
        "(process RSS). Preserved during the edit: "
        + (f"`{report['preserve']}`" if report.get("preserve") else "nothing")
        + (" (the default: the model's world)" if report.get("preserve_default") else "")
        + ".",
        "",
    ]
    if "delta_norm" in report.get("info", {}):
        lines += [f"Training (first and last logged steps): {training(report['info'])}.", ""]
    if report.get("warnings"):
        lines += ["**WARNING:**", "", *[f"- {w}" for w in report["warnings"]], ""]
    if "erasure" in report:
        other = "colour" if report["kind"] == "shape" else "shape"
        lines += [
            "## Erasure",
            "",
            f"*Erased*: the image is valid (the pixel judge finds one clean object of the prompt's {other}) and "
            "neither judge (probe, pixel judge) sees the concept; higher is better after the edit. *Invalid* images "
            "never count as erased. *Probe-only* is the old figure: the probe alone sees the concept (lower is "
            "better). "
            "95 % Wilson intervals in brackets.",
            "",
            "| prompts | n | erased before | erased after | invalid before | invalid after | probe-only before "
            "| probe-only after |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in report["erasure"].items():
            if r is None:
                lines.append(f"| {name} | 0 | n/a | n/a | n/a | n/a | n/a | n/a |")
                continue
            cells = [r[k][t] for k in ("erased", "invalid", "probe_only") for t in ("before", "after")]
            lines.append(f"| {name} | {r['n']} | " + " | ".join(_r(c) for c in cells) + " |")
        word = report["erasure"].get("word") or {}
        if "floor" in word:
            f = word["floor"]
            lines += [
                f"| *word removed* (unedited) | {f['erased']['n']} | {_r(f['erased'])} | | {_r(f['invalid'])} | "
                f"| {_r(f['probe_only'])} | |",
            ]
        lines.append("")
        for name, r in report["erasure"].items():
            if r is not None:
                reasons = ", ".join(f"{k} {v}" for k, v in r["reasons"]["after"].items())
                lines.append(f"- verdicts after the edit, {name} prompts: {reasons}")
        sc = report.get("scores", {})
        lines += [
            "",
            "*Word removed*: the unedited model on the word prompts with the erased word deleted, same seeds (what the "
            "model draws when never told the concept). **Normalised erasure** = (erased after − erased before) / "
            f"(word removed − erased before) = **{_num(sc.get('normalised_erasure'))}** (shown clipped to [0, 1]: "
            f"{_num(sc.get('normalised_erasure_shown'))}; denominator {_num(sc.get('floor_gap'))}).",
        ]
        p = report["preservation"]
        lines += [
            "",
            "## Preservation",
            "",
            "Accuracy by the probe, the pixel judge (an invalid image is wrong) and both at once, on the same prompts "
            f"and seeds before and after; chance: shape {_pct(p['chance']['shape'])}, colour "
            f"{_pct(p['chance']['colour'])}.",
            "",
            "| prompts | attribute | judge | n | before | after |",
            "|---|---|---|---:|---:|---:|",
        ]
        groups = {"preserved": f"other {report['kind']}s", "erased_prompts": f"erased prompts' {other}"}
        for group, label in groups.items():
            for kind, judges in (p.get(group) or {}).items():
                if kind in ("shape", "colour"):
                    for j, v in judges.items():
                        lines.append(
                            f"| {label} | {kind} | {j} | {v['before']['n']} | {_r(v['before'])} | {_r(v['after'])} |"
                        )
        lines += [
            "",
            f"**Preservation (normalised)**, the smallest after / before ratio of the both-judges accuracies: "
            f"**{_num(sc.get('preservation'))}**. **Joint score** (harmonic mean of normalised erasure and "
            f"preservation, each clipped to [0, 1]): **{_num(sc.get('joint'))}**.",
            "",
            "| distance on probe features (preserved prompts) | value |",
            "|---|---:|",
        ]
        if "paired_distance" in p:
            d = p["paired_distance"]
            lines.append(
                f"| paired per-seed L2, unedited vs edited (mean, 95 % bootstrap), n {d['n']} "
                f"| {d['mean']:.2f} ({d['ci'][0]:.2f}–{d['ci'][1]:.2f}) |"
            )
        if "paired_distance_other_seeds" in p:
            d = p["paired_distance_other_seeds"]
            lines.append(
                f"| L2 between two seed sets of the unedited model (reference) | {d['mean']:.2f} "
                f"({d['ci'][0]:.2f}–{d['ci'][1]:.2f}) |"
            )
        if "frechet" in p:
            lines.append(f"| Fréchet vs unedited, same seeds | {p['frechet']:.2f} |")
        if "frechet_floor" in p:
            lines.append(f"| Fréchet between two seed sets of the unedited model | {p['frechet_floor']:.2f} |")
    if "robustness" in report:
        lines += [
            "",
            "## Robustness (attack success: probe sees the concept)",
            "",
            "| attack | success | budget |",
            "|---|---:|---|",
        ]
        r = report["robustness"]
        lines.append(f"| RECE regenerating embedding | {_pct(r['regenerating_embedding']['success'])} | closed form |")
        s = r["soft_prompt"]
        lines.append(f"| soft prompt ({s['tokens']} tokens) | {_pct(s['success'])} | {s['steps']} Adam steps |")
    if "erasure" not in report:
        lines += ["No probe judges this model (the figures exist for the built-in `shapes` model): see the grid."]
    lines += ["", "Samples: before_after.png. Prompts (first of each set):", ""]
    lines += [
        f"- {name}: " + "; ".join(f"`{p}`" for p in prompts) for name, prompts in report["prompts"].items() if prompts
    ]
    return "\n".join(lines) + "\n"
