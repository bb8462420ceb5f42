"""`jaxdiff erase`: one erasure method from its config on a pipeline; writes the edited model, a grid and a report.

    erase(config, out) -> report dict

Output folder:
  model/            the edited pipeline (jaxdiff checkpoint; `jaxdiff export out/model DST` gives a diffusers folder)
  adapter/          SPM only: the adapters (safetensors) and the Facilitated Transport settings
  before_after.png  rows of unedited / edited samples (same seeds) for the target word, its synonyms, held-out
                    templates and preserved concepts
  report.json, report.md   erasure / preservation figures from the shapes probe (built-in `shapes` model), the
                    edit's wall-clock time and peak memory, optionally attack success rates
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
from jaxdiff.erase.config import split_list
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
    if registry.get(config.method).needs_anchor and not str(config.anchor).strip():
        raise UserError(f"{config.method} needs an anchor concept (--config.anchor=...), e.g. square for circle")
    scheduler = config.eval.scheduler
    if scheduler and scheduler not in SCHEDULERS and scheduler not in DIFFUSERS_CLASSES:
        raise UserError(f"config.eval.scheduler={scheduler!r} is unknown; choose from {', '.join(SCHEDULERS)}")


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


def _sets(job: Job, concept: ev.Concept | None) -> dict[str, tuple[list[str], list]]:
    n = int(job.config.eval.num_images)
    if concept is not None:
        return ev.prompt_sets(concept, n, int(job.config.eval.seed))
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
    prompts = ev.captions(concept, n, int(e.seed) + 7)[0]
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
    job = Job(config, work, progress)  # resolves the concept and loads the model: nothing is written before
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
        "preserve": config.preserve,
        "anchor": config.anchor,
        "model": str(config.model),
        "cost": {"seconds": seconds, "peak_rss_gb": peak},
        "info": _jsonable(result.info),
    }
    sets = _sets(job, concept)
    before, after, rows = {}, {}, []
    e = config.eval
    for i, (name, (prompts, _)) in enumerate(sets.items()):
        if not prompts:
            continue
        latents = ev.noise(len(prompts), job.latent_shape, int(e.seed) + i)
        before[name] = job.images(prompts, latents)
        after[name] = job.images(prompts, latents, result.unet_params, result.params_for_prompt)
        k = min(GRID_SAMPLES, len(prompts))
        rows += [(f"{name}\nbefore", before[name][:k]), (f"{name}\nafter ({config.method})", after[name][:k])]
    if concept is not None:
        judge = probe()
        prompts = sets["preserved"][0]
        floor = job.images(prompts, ev.noise(len(prompts), job.latent_shape, int(e.seed) + 1000))
        report.update(ev.evaluate(judge, concept, before, after, sets, floor))
        # What a perfect erasure towards "nothing" gives: the unedited model on the word prompts without the word
        # (its prior fills the gap: in shapes, "a red" draws round blobs the probe calls circles).
        prompts = job.replaced(sets["word"][0], "") if job.concepts == [concept.word] else None
        if prompts is not None:
            without = job.images(prompts, ev.noise(len(prompts), job.latent_shape, int(e.seed)))
            report["erasure"]["word"]["without_word"] = ev.attack_success(judge, concept, without)
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


def markdown(report: dict) -> str:
    """report.md: the figures of report.json as tables."""
    lines = [
        f"# {report['method']}: erase `{report['concept']}`"
        + (f" (the {report['resolved']})" if report.get("resolved", report["concept"]) != report["concept"] else "")
        + f" from `{report['model']}`",
        "",
        f"Edit: {report['cost']['seconds']:.1f} s wall-clock, peak memory {report['cost']['peak_rss_gb']:.2f} GiB "
        "(process RSS).",
        "",
    ]
    if "erasure" in report:
        lines += [
            "## Erasure (probe sees the concept; lower is better after the edit)",
            "",
            "| prompts | before | after | n |",
            "|---|---:|---:|---:|",
        ]
        for name, r in report["erasure"].items():
            lines.append(
                f"| {name} | n/a | n/a | 0 |"
                if r is None
                else f"| {name} | {_pct(r['before'])} | {_pct(r['after'])} | {r['n']} |"
            )
        without = (report["erasure"].get("word") or {}).get("without_word")
        if without is not None:
            lines += [
                "",
                f"The unedited model on the word prompts with the word removed sees the concept in {_pct(without)} "
                "(same seeds): what a perfect erasure towards nothing would give.",
            ]
        p = report["preservation"]
        lines += [
            "",
            "## Preservation (prompts of the other concepts)",
            "",
            "| measure | before | after |",
            "|---|---:|---:|",
        ]
        for key in ("shape_acc", "colour_acc"):
            lines.append(f"| {key} | {_pct(p[key]['before'])} | {_pct(p[key]['after'])} |")
        lines.append(f"| Fréchet (probe features) vs unedited, same seeds | 0 | {p['frechet']:.2f} |")
        if "frechet_floor" in p:
            lines.append(f"| Fréchet between two seed sets of the unedited model | {p['frechet_floor']:.2f} | |")
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
