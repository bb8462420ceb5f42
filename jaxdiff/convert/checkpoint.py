"""Checkpoint folders: diffusers/transformers components and pipelines, the jaxdiff format, atomic writes."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from jaxdiff import fileio
from jaxdiff.convert import layout
from jaxdiff.convert.safetensors_io import SafetensorsFile, dtype_tag, load_safetensors, write_safetensors
from jaxdiff.convert.table import CheckpointMismatchError
from jaxdiff.convert.torch_io import TORCH_SUFFIXES, load_torch_state_dict
from jaxdiff.errors import UserError
from jaxdiff.models import registry
from jaxdiff.models.model import Model, create

JAXDIFF_INDEX = "jaxdiff.json"
PARAMS = "params.safetensors"
CONFIG = "config.json"
MODEL_INDEX = "model_index.json"
FORMAT_VERSION = 1

# `<stem>[.<variant>].<ext>` and `<stem>.<ext>.index[.<variant>].json`, as diffusers/transformers name them.
_STEMS = r"(diffusion_pytorch_model|model|pytorch_model)"
_SINGLE = re.compile(rf"^{_STEMS}(?:\.(\w+))?\.(safetensors|bin)$")
_INDEX = re.compile(rf"^{_STEMS}\.(safetensors|bin)\.index(?:\.(\w+))?\.json$")
_VARIANT_RANK = {None: 0, "fp32": 1, "fp16": 2, "bf16": 3}
# Pipeline models jaxdiff has no Flax class for but a pipeline works without: dropped on convert, with a note.
_OPTIONAL_MODELS = ("safety_checker", "image_encoder")


# ---------------------------------------------------------------- small helpers


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def _write_json(path: Path, value: Mapping) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")  # inside a tmp folder


def architecture_of(config: dict, where: str | os.PathLike):
    """The Architecture for a config; the error names the file the config came from."""
    try:
        return registry.architecture_for(config)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def folder_kind(path: str | os.PathLike) -> str:
    """ "jaxdiff", "pipeline" (diffusers model_index.json), "component" (config.json) or "file"."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_file():
        return "file"
    for name, kind in ((JAXDIFF_INDEX, "jaxdiff"), (MODEL_INDEX, "pipeline"), (CONFIG, "component")):
        if (path / name).is_file():
            return kind
    raise UserError(f"{path}: not a model folder (no {JAXDIFF_INDEX}, {MODEL_INDEX} or {CONFIG} in it)")


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield `DST.tmp-<pid>` to write into; on success it replaces DST (fsync'd, DST never missing), on failure it
    is removed."""
    dst = Path(dst)
    if dst.exists() and not overwrite and (dst.is_file() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} already exists and is not empty (use --overwrite / overwrite=True to replace it)")
    tmp = dst.with_name(f"{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fileio.replace_directory(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_not_inside(src: Path, dst: Path) -> None:
    src, dst = src.resolve(), dst.resolve()
    if dst == src or dst in src.parents:
        raise UserError(f"destination {dst} would replace the source {src}; choose another folder")


# ---------------------------------------------------------------- reading PyTorch-layout weights


def find_weights(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a component folder: safetensors before .bin, a plain file before a variant (fp16...)."""
    folder = Path(folder)
    candidates = []
    for f in sorted(folder.iterdir()):
        if m := _SINGLE.match(f.name):
            candidates.append((m[3] != "safetensors", _VARIANT_RANK.get(m[2], 9), f.name, [f]))
        elif m := _INDEX.match(f.name):
            shards = sorted(set(read_json(f).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{f}: lists shards that are missing: {', '.join(missing)}")
            rank = (m[2] != "safetensors", _VARIANT_RANK.get(m[3], 9))
            candidates.append((*rank, f.name, [folder / s for s in shards]))
    if candidates:
        return min(candidates)[-1]
    loose = sorted(folder.glob("*.safetensors"))
    if len(loose) == 1:
        return loose
    raise FileNotFoundError(
        f"{folder}: no weights found (expected diffusion_pytorch_model.safetensors, model.safetensors, "
        "a sharded *.safetensors.index.json or a .bin)"
    )


def read_state_dict(files: list[Path] | Path) -> dict[str, np.ndarray]:
    """A PyTorch-layout state dict (numpy) from .safetensors (no torch) or .bin/.pt/.ckpt (weights_only) files."""
    state = {}
    for f in [files] if isinstance(files, (str, Path)) else files:
        f = Path(f)
        if f.suffix == ".safetensors":
            state.update(load_safetensors(f))
        elif f.suffix in TORCH_SUFFIXES:
            state.update(load_torch_state_dict(f))
        else:
            raise UserError(f"{f}: unknown weights format (expected .safetensors or {'/'.join(TORCH_SUFFIXES)})")
    return state


def _read_torch_layout(folder: Path, config_path: Path, files: list[Path] | None, **kw) -> tuple[Model, dict]:
    config = read_json(config_path)
    model = create(architecture_of(config, config_path), config, abstract=True, **kw)
    files = files or find_weights(folder)
    where = str(files[0]) if len(files) == 1 else f"{folder} ({len(files)} shards)"
    return model, layout.load_state_dict(model, read_state_dict(files), where=where)


# ---------------------------------------------------------------- the jaxdiff format


def _read_jaxdiff_params(folder: Path, **kw) -> tuple[Model, dict]:
    if not (folder / PARAMS).is_file():
        raise FileNotFoundError(f"{folder / PARAMS}: missing (a jaxdiff component holds {CONFIG} and {PARAMS})")
    config_path = folder / CONFIG
    config = read_json(config_path)
    model = create(architecture_of(config, config_path), config, abstract=True, **kw)
    stored = SafetensorsFile(folder / PARAMS)
    expected = traverse_util.flatten_dict(model.params, sep="/")
    missing = [k for k in expected if k not in stored]
    unexpected = sorted(k for k in stored if k not in expected)
    present = [k for k in expected if k in stored]
    misshaped = [(k, stored.shape(k), expected[k].shape) for k in present if stored.shape(k) != expected[k].shape]
    if missing or unexpected or misshaped:
        raise CheckpointMismatchError(missing, unexpected, misshaped, where=str(folder / PARAMS))
    flat = {k: np.asarray(stored[k], np.float32) for k in expected}
    return model, traverse_util.unflatten_dict(flat, sep="/")


def _same_config(a: dict, b: dict) -> bool:
    """Configs equal but for bookkeeping keys ("_class_name", "_diffusers_version", ...)."""
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    return json.loads(json.dumps(strip(a))) == json.loads(json.dumps(strip(b)))


def _write_config(folder: Path, model: Model, config_source: Path | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # The original config byte for byte, unless the model is another architecture (e.g. a retrained UNet).
    if config_source is not None and _same_config(read_json(config_source), model.config):
        shutil.copyfile(config_source, folder / CONFIG)
    else:
        _write_json(folder / CONFIG, model.config)


def _write_jaxdiff_component(folder: Path, model: Model, params, config_source: Path | None = None) -> None:
    _write_config(folder, model, config_source)
    flat = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    write_safetensors(folder / PARAMS, flat, metadata={"format": "jaxdiff"})


def _write_diffusers_component(folder: Path, model: Model, params, config_source: Path | None = None) -> None:
    _write_config(folder, model, config_source)
    # transformers refuses safetensors whose metadata lacks a known "format"; "pt" is what torch writers use.
    state = layout.to_state_dict(model, params)
    write_safetensors(folder / layout.layout(model).weights_name, state, metadata={"format": "pt"})


def _component_names(src: Path) -> dict[str, str]:
    index = read_json(src / JAXDIFF_INDEX)
    if index.get("format") != "jaxdiff" or not isinstance(index.get("components"), dict):
        raise UserError(f"{src / JAXDIFF_INDEX}: not a jaxdiff checkpoint index")
    if index.get("version", 0) > FORMAT_VERSION:
        raise UserError(f"{src / JAXDIFF_INDEX}: format version {index['version']} is newer than this jaxdiff reads")
    return index["components"]


def _pipeline_entries(src: Path, strict: bool = True) -> dict[str, str]:
    """{name: role} per model_index entry with a folder: "model", "copy" (no config.json) or "skip".

    An unsupported model is an error when `strict`, except optional ones (safety_checker), which are skipped.
    """
    roles = {}
    for name in read_json(src / MODEL_INDEX):
        sub = src / name
        if name.startswith("_") or not sub.is_dir():
            continue
        if not (sub / CONFIG).is_file():
            roles[name] = "copy"  # tokenizers, schedulers, feature extractors
        elif registry.architecture_name(read_json(sub / CONFIG)) in registry.supported():
            roles[name] = "model"
        elif strict and name not in _OPTIONAL_MODELS:
            architecture_of(read_json(sub / CONFIG), sub / CONFIG)  # raises, naming the file and the supported types
        else:
            roles[name] = "skip"
    return roles


# ---------------------------------------------------------------- public entry points


def load_component(
    path: str | os.PathLike,
    dtype=jnp.float32,
    attention: str = "auto",
    platform: str | None = None,
    weights_dtype=None,
) -> Model:
    """One model from a diffusers/transformers component folder or a (single-component) jaxdiff checkpoint.

    `platform`: the platform its programs are compiled for (None: the host's default backend). `weights_dtype`:
    the dtype its floating params are held in (cast on the host, before they reach the device; None: float32)."""
    path = Path(path)
    kind = folder_kind(path)
    if kind == "jaxdiff" and list(_component_names(path)) != ["."]:
        names = list(_component_names(path))
        raise UserError(f"{path}: holds components {', '.join(names)}; load one, e.g. {path / names[0]}")
    if kind == "pipeline":
        raise UserError(
            f"{path}: is a pipeline folder; load one component (e.g. {path / 'unet'}) or all of them "
            "with load_components"
        )
    if kind == "file":
        raise UserError(f"{path}: is a file; pass the folder holding it and its config.json")
    if (path / PARAMS).is_file():
        model, params = _read_jaxdiff_params(path, dtype=dtype, attention=attention, platform=platform)
    else:
        model, params = _read_torch_layout(
            path, path / CONFIG, None, dtype=dtype, attention=attention, platform=platform
        )
    model = dataclasses.replace(model, params=params)
    if weights_dtype is not None:  # on the host's numpy arrays, so the float32 copy never reaches the device
        model = model.with_params_dtype(weights_dtype)
    return dataclasses.replace(model, params=jax.tree.map(jnp.asarray, model.params))


def load_components(
    path: str | os.PathLike,
    dtype=jnp.float32,
    attention: str = "auto",
    platform: str | None = None,
    weights_dtype=None,
) -> dict[str, Model]:
    """Every model component of a diffusers pipeline folder or jaxdiff checkpoint, by name ("." for a lone one)."""
    path = Path(path)
    kind = folder_kind(path)
    if kind == "jaxdiff":
        names = list(_component_names(path))
    elif kind == "pipeline":
        names = [name for name, role in _pipeline_entries(path).items() if role == "model"]
    else:
        return {".": load_component(path, dtype, attention, platform, weights_dtype)}
    return {name: load_component(path / name, dtype, attention, platform, weights_dtype) for name in names}


def convert(src, dst, *, config=None, overwrite: bool = False, progress: bool | None = False) -> dict:
    """A diffusers pipeline/component folder, or one weights file with `config`, -> a jaxdiff checkpoint."""
    src, dst = Path(src), Path(dst)
    kind = folder_kind(src)
    if kind == "jaxdiff":
        raise UserError(f"{src}: is already a jaxdiff checkpoint (use export to get a diffusers folder)")
    if kind == "file" and config is None:
        raise UserError(f"{src}: converting a single weights file needs its config (--config config.json)")
    _check_not_inside(src, dst)
    roles = _pipeline_entries(src) if kind == "pipeline" else {}
    if kind == "pipeline":
        plan = {n: (src / n, src / n / CONFIG, None) for n, role in roles.items() if role == "model"}
        if not plan:
            raise UserError(f"{src / MODEL_INDEX}: no component jaxdiff supports ({', '.join(registry.supported())})")
    else:
        plan = {".": (src, Path(config) if config else src / CONFIG, [src] if kind == "file" else None)}
    summary = {"src": str(src), "dst": str(dst), "components": {}}
    summary["copied"] = [n for n, role in roles.items() if role == "copy"]
    summary["skipped"] = [n for n, role in roles.items() if role == "skip"]
    with atomic_directory(dst, overwrite) as tmp:
        bar = tqdm(plan.items(), desc="convert", unit="component", disable=_disable(progress))
        for name, (folder, config_path, files) in bar:
            model, params = _read_torch_layout(folder, config_path, files)
            _write_jaxdiff_component(tmp / name, model, params, config_source=config_path)
            summary["components"][name] = _describe(model, params)
        for name in summary["copied"]:
            shutil.copytree(src / name, tmp / name)
        if kind == "pipeline":
            index = read_json(src / MODEL_INDEX)
            if summary["skipped"]:  # dropped models must not be looked for when diffusers loads the export
                _write_json(tmp / MODEL_INDEX, {**index, **{name: [None, None] for name in summary["skipped"]}})
            else:
                shutil.copyfile(src / MODEL_INDEX, tmp / MODEL_INDEX)
        classes = {name: c["class"] for name, c in summary["components"].items()}
        _write_json(tmp / JAXDIFF_INDEX, {"format": "jaxdiff", "version": FORMAT_VERSION, "components": classes})
    return summary


def save_checkpoint(dst, models: Model | Mapping[str, Model], *, overwrite: bool = False) -> None:
    """Write in-memory models (their current params) as a jaxdiff checkpoint."""
    models = {".": models} if isinstance(models, Model) else dict(models)
    with atomic_directory(dst, overwrite) as tmp:
        _write_models(tmp, models)


def _write_models(folder: Path, models: Mapping[str, Model], config_sources: Mapping[str, Path] | None = None) -> None:
    """Each model's config and current params as a jaxdiff component, then the checkpoint index."""
    for name, model in models.items():
        source = (config_sources or {}).get(name)
        _write_jaxdiff_component(folder / name, model, jax.device_get(model.params), source)
    classes = {name: m.architecture.name for name, m in models.items()}
    _write_json(folder / JAXDIFF_INDEX, {"format": "jaxdiff", "version": FORMAT_VERSION, "components": classes})


def save_pipeline(src, dst, models: Mapping[str, Model], *, overwrite: bool = False) -> None:
    """Write a pipeline as a jaxdiff checkpoint from in-memory `models` ({component: Model}, e.g. with an edited
    UNet), copying the non-model entries of the source pipeline folder `src` (tokenizers, scheduler, model_index.json,
    sampling defaults) so that the result loads with `load_pipeline` and exports with `export`."""
    src = Path(src)
    with atomic_directory(dst, overwrite) as tmp:
        for entry in src.iterdir():
            if entry.name in models or entry.name == JAXDIFF_INDEX or entry.name.startswith("."):
                continue
            if entry.is_dir():
                if not (entry / CONFIG).is_file():  # tokenizers, schedulers
                    shutil.copytree(entry, tmp / entry.name)
            elif entry.suffix in (".json", ".txt", ".md"):
                shutil.copyfile(entry, tmp / entry.name)
        sources = {name: src / name / CONFIG for name in models if (src / name / CONFIG).is_file()}
        _write_models(tmp, models, sources)


def export(src, dst, *, overwrite: bool = False, progress: bool | None = False) -> dict:
    """A jaxdiff checkpoint folder (or a Model, or {name: Model}) -> a diffusers/transformers folder (safetensors)."""
    dst = Path(dst)
    in_memory = isinstance(src, (Model, Mapping))
    summary = {"src": "<in memory>" if in_memory else str(src), "dst": str(dst), "components": {}, "copied": []}
    if in_memory:
        models = {".": src} if isinstance(src, Model) else dict(src)
        jobs = {n: (lambda m=m: (m, jax.device_get(m.params)), None) for n, m in models.items()}
        extras = []
    else:
        src = Path(src)
        if folder_kind(src) != "jaxdiff":
            raise UserError(f"{src}: not a jaxdiff checkpoint (no {JAXDIFF_INDEX}); use convert for diffusers folders")
        _check_not_inside(src, dst)
        names = _component_names(src)
        jobs = {n: (lambda n=n: _read_jaxdiff_params(src / n), src / n / CONFIG) for n in names}
        extras = [src / name for name in _extras(src, names)]
    with atomic_directory(dst, overwrite) as tmp:
        bar = tqdm(jobs.items(), desc="export", unit="component", disable=_disable(progress))
        for name, (read, config_source) in bar:
            model, params = read()
            _write_diffusers_component(tmp / name, model, params, config_source=config_source)
            summary["components"][name] = _describe(model, params)
        for p in extras:
            shutil.copytree(p, tmp / p.name) if p.is_dir() else shutil.copyfile(p, tmp / p.name)
            summary["copied"].append(p.name)
    return summary


def _extras(src: Path, components) -> list[str]:
    """Entries of a jaxdiff checkpoint carried verbatim (tokenizers, scheduler, model_index.json)."""
    if "." in components:
        return []
    return sorted(p.name for p in src.iterdir() if p.name != JAXDIFF_INDEX and p.name not in components)


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # None: tqdm shows a bar only on a terminal


def _describe(model: Model, params) -> dict:
    leaves = jax.tree_util.tree_leaves(params)
    return {"class": model.architecture.name, "tensors": len(leaves), "params": int(sum(np.size(x) for x in leaves))}


def info(path: str | os.PathLike) -> dict:
    """Components, classes, parameter counts and stored dtypes of a checkpoint folder or weights file.

    Reads only the headers of safetensors files; .bin files are loaded (weights_only).
    """
    path = Path(path)
    kind = folder_kind(path)
    result = {"path": str(path), "format": kind, "components": {}, "other": []}
    if kind == "file":
        result["components"]["."] = _tensor_stats([path])
        return result
    if kind == "jaxdiff":
        folders = {n: [path / n / PARAMS] for n in _component_names(path)}
        result["other"] = _extras(path, folders)
    elif kind == "pipeline":
        roles = _pipeline_entries(path, strict=False)
        folders = {n: find_weights(path / n) for n, role in roles.items() if role != "copy"}
        result["other"] = [n for n, role in roles.items() if role == "copy"]
    else:
        folders = {".": find_weights(path)}
    for name, files in folders.items():
        config = read_json(path / name / CONFIG) if (path / name / CONFIG).is_file() else {}
        cls = registry.architecture_name(config)
        result["components"][name] = {"class": cls, "supported": cls in registry.supported(), **_tensor_stats(files)}
    return result


def _tensor_stats(files: list[Path]) -> dict:
    shapes, dtypes = {}, {}
    for f in files:
        if f.suffix == ".safetensors":
            header = SafetensorsFile(f).header
            shapes.update({k: v["shape"] for k, v in header.items()})
            dtypes.update({k: v["dtype"] for k, v in header.items()})
        else:
            state = load_torch_state_dict(f, upcast=False)
            shapes.update({k: v.shape for k, v in state.items()})
            dtypes.update({k: dtype_tag(v.dtype) for k, v in state.items()})
    return {
        "weights": [f.name for f in files],
        "tensors": len(shapes),
        "params": int(sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())),
        "dtypes": dict(collections.Counter(dtypes.values())),
    }
