"""`jaxdiff personalize`: teach a model a new token from a folder of images; writes a loadable model and a report.

    personalize(config, out) -> report dict

Output folder:
  model/                      the personalised pipeline (jaxdiff checkpoint: the tokenizer knows the token, the text
                              encoder's table has its row, the UNet has the LoRA merged): `load_pipeline(OUT/model)`
  learned_embeds.safetensors  the token's row, diffusers' textual-inversion layout {token: [1, D]}
  lora/                       DreamBooth-LoRA: adapters.safetensors ({module path}/down, /up) and lora.json (scale)
  samples.png                 the instance images, then samples of the config's prompts naming the token
  report.json, report.md      method, steps, losses, trainable parameters, wall-clock time, how to load it
  train/                      the runner's orbax checkpoints (a killed run resumes), metrics.jsonl, TensorBoard

Every input (image folder, token, config) is checked before the first write. `apply(pipe, OUT)` adds a run's token
and LoRA to an already loaded pipeline.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import jax
import ml_collections as mlc
import numpy as np

from jaxdiff import fileio
from jaxdiff.errors import UserError
from jaxdiff.personalize import (
    attencraft,
    custom_diffusion,
    dreambooth,
    dreambooth_lora,
    dreamcreature,
    prospect,
    textual_inversion,
    tokens,
)
from jaxdiff.personalize.job import Job

METHODS = {
    "textual_inversion": textual_inversion,
    "dreambooth_lora": dreambooth_lora,
    "dreambooth": dreambooth,
    "custom_diffusion": custom_diffusion,
    "prospect": prospect,
    "attencraft": attencraft,
    "dreamcreature": dreamcreature,
}
LORA_DIR, LORA_FILE, LORA_META = "lora", "adapters.safetensors", "lora.json"


def _saved_config(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None


def _check_out(out: Path, config: mlc.ConfigDict) -> None:
    """OUT must be new, empty, or hold a run of this very config (which then resumes)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    saved = _saved_config(out)
    if saved != json.loads(config.to_json_best_effort()):
        what = "exists and is not a personalize output folder" if saved is None else "holds a run of another config"
        raise FileExistsError(f"--out {out} {what} (see its config.json); use another --out")


def validate(config: mlc.ConfigDict) -> None:
    if config.method not in METHODS:
        raise UserError(f"unknown personalization method {config.method!r}; choose from {', '.join(METHODS)}")
    if not str(config.images):
        raise UserError("no image folder: give --images DIR")
    want, got = getattr(METHODS[config.method], "NUM_TOKENS", 1), len(str(config.token).split(","))
    if got != want:
        what = "one token" if want == 1 else f"{want} tokens: give --token '<a>,<b>'"
        raise UserError(f"--token {config.token!r}: the {config.method} method learns {what}")
    if int(config.train.steps) <= 0 or int(config.train.batch_size) <= 0:
        raise UserError("config.train.steps and config.train.batch_size must be positive")


def save_model(job: Job, rows, unet_params, dst: Path) -> None:
    """OUT/model: the source pipeline with the extended tokenizer, the text encoder's table grown by `rows`
    (vocab_size updated) and `unet_params`."""
    import dataclasses

    from jaxdiff.convert import checkpoint

    te = tokens.with_vocab(job.text_encoder, tokens.merge_rows(job.text_encoder.params, rows))
    models = {"unet": dataclasses.replace(job.unet, params=unet_params), "vae": job.pipe.vae, "text_encoder": te}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        for entry in job.pipe.path.iterdir():  # everything but weights and the old tokenizer
            if entry.name in models:
                (src / entry.name).mkdir()
                if (entry / "config.json").is_file():
                    shutil.copyfile(entry / "config.json", src / entry.name / "config.json")
            elif entry.is_file() and entry.suffix in (".json", ".txt", ".md"):
                shutil.copyfile(entry, src / entry.name)
            elif entry.is_dir() and entry.name != "tokenizer" and not entry.name.startswith("."):
                shutil.copytree(entry, src / entry.name)
        (src / "text_encoder" / "config.json").write_text(json.dumps(te.config, indent=2) + "\n")
        job.tokenizer.save_pretrained(str(src / "tokenizer"))
        checkpoint.save_pipeline(src, dst, models, overwrite=True)


def _save_lora(folder: Path, adapters: dict, scale: float, config: mlc.ConfigDict) -> None:
    from jaxdiff import lora
    from jaxdiff.convert import checkpoint
    from jaxdiff.convert.safetensors_io import write_safetensors

    meta = {"scale": scale, "rank": int(config.lora.rank), "alpha": float(config.lora.alpha)}
    meta["targets"], meta["params"] = str(config.lora.targets), lora.num_params(adapters)
    with checkpoint.atomic_directory(folder, overwrite=True) as tmp:
        write_safetensors(tmp / LORA_FILE, lora.to_flat(adapters), metadata={"format": "jaxdiff-lora"})
        (tmp / LORA_META).write_text(json.dumps(meta, indent=2) + "\n")


def apply(pipe, path: str | os.PathLike, multiplier: float = 1.0):
    """A new pipeline with a personalize run's token (OUT/learned_embeds.safetensors, or that file itself) and, when
    the run has one, its LoRA (OUT/lora) merged into the UNet with `multiplier` × its scale:

        pipe = jaxdiff.personalize.apply(load_pipeline("shapes"), "runs/NAME")
    """
    import dataclasses

    from jaxdiff import lora
    from jaxdiff.convert.safetensors_io import load_safetensors

    path = Path(path)
    embeds = path if path.is_file() else path / tokens.EMBEDS_FILE
    if not embeds.is_file():
        raise FileNotFoundError(f"no {tokens.EMBEDS_FILE} at {path}")
    pipe = tokens.add_to_pipeline(pipe, tokens.load_embeds(embeds))
    folder = (path.parent if path.is_file() else path) / LORA_DIR
    if (folder / LORA_FILE).is_file():
        meta = json.loads((folder / LORA_META).read_text())
        adapters = lora.from_flat(load_safetensors(folder / LORA_FILE, copy=True))
        unet = dataclasses.replace(pipe.unet, params=lora.merge(pipe.unet.params, adapters, multiplier * meta["scale"]))
        pipe = dataclasses.replace(pipe, unet=unet, _compiled={})
    return pipe


def _samples(job: Job, pipe, prompts: list[str]) -> list[tuple[str, np.ndarray]]:
    return job.sample_rows(prompts, lambda prompt, n, **kw: pipe([prompt] * n, **kw))


def personalize(config: mlc.ConfigDict, out: str | os.PathLike, *, progress: bool = True) -> dict:
    """Train the configured method; write model/, the embedding (and LoRA) files, samples.png and the report."""
    from jaxdiff.images import labeled_rows, save_png
    from jaxdiff.sampling.pipeline import load_pipeline

    out = Path(out)
    validate(config)
    _check_out(out, config)
    job = Job(config, out, progress)  # every input check; nothing is written before this returns
    out.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(out / "config.json", config.to_json_best_effort(indent=2) + "\n")
    method = METHODS[config.method]
    t0 = time.perf_counter()
    plan = method.plan(job)
    trained, info = job.train(plan)
    seconds = time.perf_counter() - t0
    result = method.outputs(job, trained)
    save_model(job, result["rows"], jax.device_get(result["unet"]), out / "model")
    tokens.save_embeds(out / tokens.EMBEDS_FILE, job.tokens, result["rows"])
    if hasattr(method, "save_extra"):  # e.g. ProSpect's stage vectors
        method.save_extra(job, result, out)
    if "lora" in result:
        _save_lora(out / LORA_DIR, jax.device_get(result["lora"]), result["lora_scale"], config)

    personal = load_pipeline(out / "model")
    prompts = [p.format(*job.tokens) for p in config.sample.prompts]
    sampled = method.samples(job, personal, prompts, result) if hasattr(method, "samples") else None
    sampled = _samples(job, personal, prompts) if sampled is None else sampled
    rows = [("instance\nimages", job.images[:8])] + [(p, im) for p, im in sampled]
    save_png(out / "samples.png", labeled_rows(rows))
    report = {
        "method": config.method,
        "token": ",".join(job.tokens),
        "token_id": job.new_ids[0],
        "model": str(config.model),
        "images": len(job.images),
        "captions": [p[0] for p in job.prompts][:8],
        "trainable_params": int(result["trained_params"]),
        "steps": info["steps"],
        "resumed_from": info["resumed_from"],
        "loss_last": info["last"].get("loss", info["last"].get("loss_personal")),
        "seconds": seconds,
        "compile_s": info["compile_s"],
        "load": f"load_pipeline({str(out / 'model')!r})",
        "apply": f"jaxdiff.personalize.apply(load_pipeline({str(config.model)!r}), {str(out)!r})",
    }
    fileio.atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    fileio.atomic_write_text(out / "report.md", markdown(report))
    return report


def markdown(r: dict) -> str:
    loss = "n/a" if r["loss_last"] is None else f"{r['loss_last']:.4f}"
    lines = [
        f"# {r['method']}: `{r['token']}` (id {r['token_id']}) on `{r['model']}`",
        "",
        f"{r['images']} instance images, {r['steps']} steps ({r['seconds']:.1f} s wall-clock, compile "
        f"{r['compile_s']:.1f} s; resumed from step {r['resumed_from']}), {r['trainable_params']:,} trained "
        f"parameters, last logged loss {loss}.",
        "",
        "Captions (first of each image): " + "; ".join(f"`{c}`" for c in r["captions"]),
        "",
        "Load the personalised pipeline:",
        "",
        "```python",
        "from jaxdiff.sampling.pipeline import load_pipeline",
        f"pipe = {r['load']}",
        f"images = pipe(['a red {r['token']}'])",
        "# or add the token (and LoRA) to a loaded base pipeline:",
        "import jaxdiff.personalize",
        f"pipe = {r['apply']}",
        "```",
        "",
        "Samples: samples.png.",
    ]
    return "\n".join(lines) + "\n"


def summary(report: dict) -> str:
    loss = "n/a" if report["loss_last"] is None else f"{report['loss_last']:.4f}"
    return (
        f"{report['method']}: taught {report['token']!r} from {report['images']} images in {report['steps']} steps "
        f"({report['seconds']:.1f} s, {report['trainable_params']:,} trained parameters, last loss {loss})"
    )
