"""CopyScope attribution (Zhou et al., arXiv 2311.12847): Shapley values of a diffusion workflow's components.

    jaxdiff evaluate copyscope --base shapes --components erase_circle=runs/uce_circle erase_red=runs/uce_red \\
        --reference circles/ --prompts prompts.txt --num-images 2 --out copyscope.json

Players are components added to a base model; the base is always there (the empty coalition is the base alone).
A component is a folder holding a model of the base's architecture (an erasure output `OUT` or `OUT/model`, a
fine-tune, a single component folder such as a UNet) or an SPM adapter folder (`OUT/adapter`); its contribution is
its weight delta from the base, and a coalition's model is base + Σ deltas of its members (task arithmetic: for one
member it is exactly that model; for several it adds their edits, which is not the same as re-running one joint
edit). SPM adapters are merged at full strength (γ = 1, what `OUT/model` holds): Facilitated Transport's per-prompt
scale is not applied. LoRA files in kohya/PEFT/diffusers layouts have no loader in jaxdiff: merge them into a model
folder first.

The value: D(S), the Fréchet distance between the reference set and the images of coalition S (the same prompts
and seeds for every coalition), on the shapes probe's features (fd-probe) or, with `--inception`, FID. The utility
is U(S) = D(S) − D(∅), as CopyScope's "PFID": lower distance = closer to the reference, so a component that makes
the images closer to it gets a negative φ, and the reported normalised attribution −φ_i / Σ_j |φ_j| is positive
for it. φ is the textbook Shapley value over all 2ⁿ coalitions (up to MAX_EXACT_PLAYERS players) or its
permutation-sampling estimate with a standard error per player; leave-one-out U(N) − U(N∖{i}) is reported beside
it. (CopyScope's notebook sums U over sub-coalitions first, a quirk of its template; this is the README formula.)

Each (coalition, seed)'s images are cached under `--cache` as one `.npz`, keyed by the sorted member names, each
member's weight-delta digest and the sampling settings, written atomically: a rerun, a run with more components
(the old coalitions keep their keys) or more images per prompt reuses them.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from jaxdiff import fileio
from jaxdiff.errors import UserError
from jaxdiff.metrics import evaluate as ev
from jaxdiff.metrics import frechet

MAX_EXACT_PLAYERS = 12  # 4096 coalitions; beyond, --permutations K
SIGN = "U(S) = D(S) - D(base); phi < 0: the component brings the images closer to the reference"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_PIPELINES: dict = {}  # the last base pipeline loaded, by resolved path
_COMPONENTS: dict = {}  # loaded components by (base, folder, its files' sizes and mtimes)

Value = Callable[[frozenset], float]

# ------------------------------------------------------------------------------------------------ game theory


def _memo(value: Value) -> Value:
    table: dict[frozenset, float] = {}

    def cached(s: frozenset) -> float:
        if s not in table:
            table[s] = float(value(s))
        return table[s]

    return cached


def coalition(mask: int, n: int) -> frozenset:
    """The players whose bit is set in `mask`."""
    return frozenset(i for i in range(n) if mask >> i & 1)


def all_coalitions(n: int) -> list[frozenset]:
    """Every subset of range(n), by size then members."""
    return [frozenset(c) for k in range(n + 1) for c in itertools.combinations(range(n), k)]


def shapley_exact(value: Value, n: int) -> np.ndarray:
    """φ_i = Σ_{S ⊆ N∖{i}} |S|!(n−|S|−1)!/n! · [v(S ∪ {i}) − v(S)] over all 2ⁿ coalitions; [n] float64."""
    if n < 1:
        raise ValueError(f"need at least one player, got {n}")
    masks = np.arange(1 << n)
    v = np.array([value(coalition(int(m), n)) for m in masks], np.float64)
    size = np.array([bin(int(m)).count("1") for m in masks])
    weight = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in range(n)])
    phi = np.zeros(n)
    for i in range(n):
        without = masks[(masks >> i & 1) == 0]
        phi[i] = np.sum(weight[size[without]] * (v[without | 1 << i] - v[without]))
    return phi


def sample_permutations(n: int, num_permutations: int, seed: int = 0) -> np.ndarray:
    """[K, n] random orders of the players (numpy seed `seed`)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n) for _ in range(num_permutations)]).reshape(num_permutations, n)


def permutation_coalitions(perms: np.ndarray) -> list[frozenset]:
    """The coalitions the orders visit (every prefix, ∅ included), by size then members."""
    seen = {frozenset(perm[:k].tolist()) for perm in perms for k in range(len(perm) + 1)}
    return sorted(seen, key=lambda s: (len(s), sorted(s)))


def shapley_permutations(value: Value, n: int, num_permutations: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Monte-Carlo Shapley: the mean over K random orders of each player's marginal contribution when it joins,
    and its standard error std/√K (NaN for K = 1). Every order's contributions sum to v(N) − v(∅), so the
    estimate is efficient exactly. Returns (φ [n], stderr [n])."""
    if num_permutations < 1:
        raise ValueError(f"need at least one permutation, got {num_permutations}")
    value = _memo(value)
    marginal = np.zeros((num_permutations, n))
    for k, perm in enumerate(sample_permutations(n, num_permutations, seed)):
        members: set[int] = set()
        previous = value(frozenset())
        for i in perm:
            members.add(int(i))
            current = value(frozenset(members))
            marginal[k, i] = current - previous
            previous = current
    stderr = marginal.std(axis=0, ddof=1) / math.sqrt(num_permutations) if num_permutations > 1 else np.full(n, np.nan)
    return marginal.mean(axis=0), stderr


def leave_one_out(value: Value, n: int) -> np.ndarray:
    """v(N) − v(N∖{i}) per player: what removing it from the full workflow changes; [n]."""
    full = frozenset(range(n))
    return np.array([value(full) - value(full - {i}) for i in range(n)], np.float64)


def normalised(phi: Sequence[float]) -> np.ndarray:
    """CopyScope's reported attribution −φ_i / Σ_j |φ_j| (zeros when every φ is 0)."""
    phi = np.asarray(phi, np.float64)
    total = np.abs(phi).sum()
    return -phi / total if total > 0 else np.zeros_like(phi)


# ------------------------------------------------------------------------------------------------ components


@dataclasses.dataclass
class Component:
    """A player: its weight delta from the base, {pipeline model ("unet", "text_encoder", ...): {leaf: Δ}},
    changed leaves only (float32)."""

    name: str
    path: str
    kind: str  # "model" | "spm-adapter"
    deltas: dict[str, dict[str, np.ndarray]]

    @property
    def num_changed(self) -> tuple[int, int]:
        """(changed leaves, changed parameters)."""
        leaves = [d for model in self.deltas.values() for d in model.values()]
        return len(leaves), int(sum(d.size for d in leaves))

    def digest(self) -> str:
        h = hashlib.sha256()
        for model in sorted(self.deltas):
            for leaf in sorted(self.deltas[model]):
                d = np.ascontiguousarray(self.deltas[model][leaf], np.float32)
                h.update(f"{model}/{leaf}{d.shape}".encode())
                h.update(d.tobytes())
        return h.hexdigest()[:16]


def pipeline_models(pipe) -> dict:
    """{name: Model} of a pipeline, named as in its folder."""
    models = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoders[0]}
    if len(pipe.text_encoders) > 1:
        models["text_encoder_2"] = pipe.text_encoders[1]
    return models


def flat_params(pipe) -> dict[str, dict]:
    """{model name: {"a/b/kernel": array}} of a pipeline's params."""
    from flax import traverse_util

    return {name: traverse_util.flatten_dict(m.params, sep="/") for name, m in pipeline_models(pipe).items()}


def _names(keys: Iterable[str], limit: int = 4) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def weight_delta(where: str, base: dict, other: dict) -> dict[str, np.ndarray]:
    """{leaf: other − base} for the leaves that differ; a UserError naming the leaves that differ in shape or are
    missing on either side (the component is not the base's architecture)."""
    missing = sorted(set(base) - set(other))
    extra = sorted(set(other) - set(base))
    shaped = sorted(
        f"{k} {tuple(np.shape(other[k]))} vs base {tuple(np.shape(base[k]))}"
        for k in set(base) & set(other)
        if np.shape(other[k]) != np.shape(base[k])
    )
    if missing or extra or shaped:
        parts = [f"leaves of another shape: {_names(shaped)}"] if shaped else []
        parts += [f"leaves missing: {_names(missing)}"] if missing else []
        parts += [f"leaves the base lacks: {_names(extra)}"] if extra else []
        raise UserError(f"{where} is not the base model's architecture: " + "; ".join(parts))
    out = {}
    for k in sorted(base):
        d = np.asarray(other[k], np.float32) - np.asarray(base[k], np.float32)
        if np.any(d):
            out[k] = d
    return out


def load_component(name: str, path: str | os.PathLike, pipe, base: dict[str, dict] | None = None) -> Component:
    """A component from a model folder, an erasure output folder (its `model/`) or an SPM adapter folder."""
    from jaxdiff.convert import checkpoint

    base = flat_params(pipe) if base is None else base
    where = f"component {name} ({path})"
    p = Path(path)
    if not p.exists():
        raise UserError(f"{where}: no such file or folder")
    if (p / "adapters.safetensors").is_file():
        return Component(name, str(path), "spm-adapter", {"unet": _spm_delta(where, p, base["unet"])})
    if any((p / "model" / f).is_file() for f in ("jaxdiff.json", "model_index.json")):
        p = p / "model"  # an erasure output folder: the edited pipeline
    try:
        models = checkpoint.load_components(p)
    except (UserError, FileNotFoundError) as e:
        raise UserError(f"{where}: {str(e).splitlines()[0]}") from None
    own = pipeline_models(pipe)
    if list(models) == ["."]:  # a lone component folder: the base model of the same class
        cls = models["."].architecture.name
        matches = [n for n, m in own.items() if m.architecture.name == cls]
        if len(matches) != 1:
            raise UserError(f"{where}: a {cls} matches {len(matches)} models of the base ({', '.join(own)})")
        models = {matches[0]: models["."]}
    elif set(models) != set(own):
        raise UserError(f"{where}: holds models {sorted(models)}, the base {sorted(own)}")
    from flax import traverse_util

    deltas = {}
    for model, m in models.items():
        flat = traverse_util.flatten_dict(m.params, sep="/")
        deltas[model] = weight_delta(f"{where}, {model}", base[model], flat)
    return Component(name, str(path), "model", {k: v for k, v in deltas.items() if v})


def base_pipeline(base: str):
    """(pipeline, resolved path) of the base, loaded once per process: its compiled sampler serves every run."""
    from jaxdiff.sampling.pipeline import load_pipeline, resolve

    try:
        base_id = str(resolve(base).resolve())
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    if base_id not in _PIPELINES:
        _PIPELINES.clear()
        _PIPELINES[base_id] = load_pipeline(base_id)
    return _PIPELINES[base_id], base_id


def _cached_component(name: str, path: str, pipe, base: dict) -> Component:
    """`load_component`, once per process for an unchanged folder (file names, sizes, mtimes) and base."""
    p = Path(path).resolve()
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())
    key = (str(Path(pipe.path).resolve()), str(p), stamp)
    if key not in _COMPONENTS:
        _COMPONENTS[key] = load_component(name, path, pipe, base)
    return dataclasses.replace(_COMPONENTS[key], name=name, path=str(path))


def _spm_delta(where: str, folder: Path, unet: dict) -> dict[str, np.ndarray]:
    """ΔK = (alpha/rank) · down ⊗ up per adapted UNet kernel of an SPM adapter folder (γ = 1)."""
    from jaxdiff import lora as adapters_lib
    from jaxdiff.convert.safetensors_io import load_safetensors

    meta_path = folder / "spm.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    scale = float(meta.get("alpha", 1.0)) / int(meta.get("rank", 1))
    groups: dict[str, dict] = {}
    for key, value in load_safetensors(folder / "adapters.safetensors").items():
        module, _, part = key.rpartition("/")
        groups.setdefault(module, {})[part] = value
    out = {}
    for module, adapter in sorted(groups.items()):
        leaf = f"{module}/kernel"
        if leaf not in unet or set(adapter) != {"down", "up"}:
            raise UserError(f"{where}: adapter {module} has no kernel in the base UNet (or lacks down/up)")
        d = np.asarray(adapters_lib.delta(adapter, scale), np.float32)
        if d.shape != tuple(np.shape(unet[leaf])):
            raise UserError(f"{where}: adapter {module} gives {d.shape}, the base kernel is {np.shape(unet[leaf])}")
        out[leaf] = d
    return out


def coalition_params(pipe, base: dict[str, dict], members: Sequence[Component]) -> dict:
    """The pipeline params (as `pipe.params`) of base + Σ deltas of `members`."""
    import jax.numpy as jnp
    from flax import traverse_util

    trees = {}
    for model, flat in base.items():
        changed: dict[str, np.ndarray] = {}
        for c in members:
            for leaf, d in c.deltas.get(model, {}).items():
                changed[leaf] = changed.get(leaf, 0.0) + d
        new = dict(flat)
        for leaf, d in changed.items():
            new[leaf] = (flat[leaf] + jnp.asarray(d)).astype(flat[leaf].dtype)
        trees[model] = traverse_util.unflatten_dict(new, sep="/")
    encoders = [trees[k] for k in ("text_encoder", "text_encoder_2") if k in trees]
    return {"unet": trees["unet"], "vae": trees["vae"], "text_encoders": encoders}


# ------------------------------------------------------------------------------------------------ sampling


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What every coalition samples: each prompt once per seed seed, seed + 1, ..., seed + num_images − 1."""

    prompts: tuple[str, ...]
    num_images: int
    seed: int
    steps: int
    guidance: float
    scheduler: str

    @property
    def total(self) -> int:
        return len(self.prompts) * self.num_images


def cache_file(cache: Path, base: str, members: Sequence[Component], sampling: Sampling, seed: int) -> Path:
    """CACHE/<names>-s<seed>-<hash>.npz; the hash covers the base, each member's name and delta digest, the prompts
    and the sampling settings (not the other players nor num_images: a larger run reuses the file)."""
    members = sorted(members, key=lambda c: c.name)
    key = {
        "base": base,
        "members": [[c.name, c.digest()] for c in members],
        "prompts": hashlib.sha256("\n".join(sampling.prompts).encode()).hexdigest(),
        "steps": sampling.steps,
        "guidance": sampling.guidance,
        "scheduler": sampling.scheduler,
        "seed": seed,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    names = "+".join(c.name for c in members) or "base"
    return cache / f"{names[:80]}-s{seed}-{digest}.npz"


def coalition_images(pipe, params_fn, cache: Path, base: str, members, sampling: Sampling) -> tuple[np.ndarray, int]:
    """uint8 [P·K, H, W, 3] images of one coalition (cached per seed) and how many seeds came from the cache."""
    out, hits, params = [], 0, None
    for seed in range(sampling.seed, sampling.seed + sampling.num_images):
        path = cache_file(cache, base, members, sampling, seed)
        images = None
        if path.is_file():
            try:
                with np.load(path) as z:
                    images = z["images"]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                images = None  # unreadable: sample again and replace it
            if images is not None and len(images) != len(sampling.prompts):
                images = None
        if images is None:
            params = params_fn() if params is None else params
            x = pipe(
                list(sampling.prompts),
                steps=sampling.steps,
                guidance=sampling.guidance,
                scheduler=sampling.scheduler,
                seed=seed,
                params=params,
            )
            images = np.clip(np.round(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)
            meta = json.dumps({"members": sorted(c.name for c in members), "seed": seed, **_settings(sampling)})
            with fileio.atomic_file(path) as f:
                np.savez(f, images=images, meta=np.asarray(meta))
        else:
            hits += 1
        out.append(images)
    return np.concatenate(out), hits


def _settings(s: Sampling) -> dict:
    return {"prompts": len(s.prompts), "steps": s.steps, "guidance": s.guidance, "scheduler": s.scheduler}


# ------------------------------------------------------------------------------------------------ the attribution


def _features(images: np.ndarray, features_of, args) -> np.ndarray:
    try:
        return features_of(images, args)
    except ValueError as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{e}: the shapes probe reads 32x32 images; for other models give --inception (FID)") from None


def attribute(
    base: str,
    components: dict[str, str],
    reference: str,
    prompts: Sequence[str],
    *,
    num_images: int = 1,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    permutations: int = 0,
    permutation_seed: int = 0,
    cache: str | os.PathLike | None = None,
    inception: str | None = None,
    mode: str = "pytorch-fid",
    batch_size: int = 50,
    progress: bool = True,
) -> dict:
    """The CopyScope record (see the module docstring) for `components` ({name: path}) added to `base`."""
    from tqdm.auto import tqdm

    from jaxdiff.generate import model_defaults

    t0 = time.perf_counter()
    names = list(components)
    _check_players(names, permutations)
    if num_images < 1 or not prompts:
        raise UserError(f"need at least one prompt and --num-images >= 1 (got {len(prompts)}, {num_images})")
    if len(prompts) * num_images < 2:
        raise UserError(
            f"{len(prompts) * num_images} image per coalition ({len(prompts)} prompts x {num_images}): the Fréchet "
            "distance needs at least 2 (a stable one many more than the feature dimension)"
        )
    for name, path in components.items():
        if not Path(path).exists():
            raise UserError(f"component {name}: no such file or folder {path}")
    metric = "fid" if inception else "fd-probe"
    features_of = ev.inception_features if inception else ev.probe_features
    network = next((d for d, f in ev.FEATURES.values() if f is features_of), features_of.__name__)
    args = argparse.Namespace(metric=metric, inception=inception, mode=mode, batch_size=batch_size, progress=False)

    if not Path(reference).exists():
        raise UserError(f"no reference at {reference} (give a folder of images or a statistics .npz)")
    pipe, base_id = base_pipeline(base)
    flat = flat_params(pipe)
    players = [_cached_component(name, components[name], pipe, flat) for name in names]
    defaults = model_defaults(pipe.path)
    sampling = Sampling(
        prompts=tuple(prompts),
        num_images=int(num_images),
        seed=int(seed),
        steps=int(steps or defaults.get("steps", 25)),
        guidance=float(defaults.get("guidance", 7.5) if guidance is None else guidance),
        scheduler=str(defaults.get("scheduler") or pipe.default_scheduler()),
    )

    mu_ref = sigma_ref = n_ref = None  # a .npz is read once the features' dimension is known
    if Path(reference).suffix != ".npz":
        ref = _features(ev.read_images(reference), features_of, args)
        ev._check_count(ref, f"reference images in {reference}")
        (mu_ref, sigma_ref), n_ref = frechet.feature_statistics(ref), len(ref)
    cache_dir = Path(cache) if cache else Path.home() / ".cache" / "jaxdiff" / "copyscope"

    n = len(players)
    perms = sample_permutations(n, permutations, permutation_seed) if permutations else None
    needed = all_coalitions(n) if perms is None else permutation_coalitions(perms)
    full = frozenset(range(n))
    needed += [s for s in [full] + [full - {i} for i in range(n)] if s not in needed]  # leave-one-out
    rows: dict[frozenset, dict] = {}
    for s in tqdm(needed, desc="copyscope coalitions", unit="coalition", disable=not progress):
        members = [players[i] for i in sorted(s)]
        images, hits = coalition_images(
            pipe, lambda m=members: coalition_params(pipe, flat, m), cache_dir, base_id, members, sampling
        )
        feats = _features(images, features_of, args)
        if mu_ref is None:
            mu_ref, sigma_ref, n_ref = ev.load_statistics(reference, feats.shape[1])
        d = frechet.frechet_distance_few(mu_ref, sigma_ref, *frechet.feature_statistics(feats))
        rows[s] = {"members": [names[i] for i in sorted(s)], "D": d, "n_images": len(images), "cached": hits}
    d0 = rows[frozenset()]["D"]
    for row in rows.values():
        row["U"] = row["D"] - d0

    def utility(s: frozenset) -> float:
        return rows[s]["U"]

    if perms is None:
        phi, stderr = shapley_exact(utility, n), None
    else:
        phi, stderr = shapley_permutations(utility, n, permutations, permutation_seed)
    loo = leave_one_out(utility, n)
    by_name = lambda x: {name: float(v) for name, v in zip(names, x)}  # noqa: E731
    return {
        "method": "exact" if perms is None else "permutations",
        "permutations": permutations or None,
        "permutation_seed": permutation_seed if perms is not None else None,
        "metric": metric,
        "network": network,
        "mode": mode if metric == "fid" else None,
        "sign": SIGN,
        "base": str(base),
        "players": names,
        "components": {
            c.name: {
                "path": c.path,
                "kind": c.kind,
                "changed_leaves": c.num_changed[0],
                "changed_params": c.num_changed[1],
            }
            for c in players
        },
        "phi": by_name(phi),
        "phi_stderr": None if stderr is None else {k: (None if np.isnan(v) else v) for k, v in by_name(stderr).items()},
        "normalised": by_name(normalised(phi)),
        "leave_one_out": by_name(loo),
        "D_base": d0,
        "D_all": rows[full]["D"],
        "sum_phi": float(np.sum(phi)),
        "coalitions": list(rows.values()),
        "reference": str(reference),
        "n_reference": n_ref,
        "n_images_per_coalition": sampling.total,
        "prompts": len(sampling.prompts),
        "num_images": sampling.num_images,
        "seed": sampling.seed,
        "steps": sampling.steps,
        "guidance": sampling.guidance,
        "scheduler": sampling.scheduler,
        "cache": str(cache_dir),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _check_players(names: Sequence[str], permutations: int) -> None:
    if not names:
        raise UserError("no components: give --components NAME=PATH ...")
    bad = [n for n in names if not _NAME.match(n)]
    if bad:
        raise UserError(f"component names must be letters, digits, '_', '.', '-': {', '.join(map(repr, bad))}")
    if permutations < 0:
        raise UserError(f"--permutations must be >= 0 (0: exact), got {permutations}")
    if permutations == 0 and len(names) > MAX_EXACT_PLAYERS:
        raise UserError(
            f"{len(names)} components: exact Shapley needs 2^{len(names)} coalitions of images (at most "
            f"{MAX_EXACT_PLAYERS} components); use --permutations K (e.g. 50) to sample"
        )


def markdown(record: dict, coalitions: bool = False) -> str:
    """The attribution as a markdown table (and optionally D per coalition)."""
    se = record.get("phi_stderr")
    unit = {"fd-probe": "probe FD", "fid": "FID"}[record["metric"]]
    lines = [
        f"| component | φ (Δ {unit}) |" + (" ± s.e. |" if se else "") + " −φ/Σ|φ| | leave-one-out |",
        "|---|---:|" + ("---:|" if se else "") + "---:|---:|",
    ]
    for name in record["players"]:
        err = f" {se[name]:.2f} |" if se and se[name] is not None else (" n/a |" if se else "")
        lines.append(
            f"| {name} | {record['phi'][name]:+.2f} |{err} {record['normalised'][name]:+.3f} | "
            f"{record['leave_one_out'][name]:+.2f} |"
        )
    method = "exact (all coalitions)" if record["method"] == "exact" else f"{record['permutations']} permutations"
    lines += [
        "",
        f"{unit} to the reference ({record['n_reference']} images): base {record['D_base']:.2f}, all components "
        f"{record['D_all']:.2f}; Σφ = {record['sum_phi']:+.2f}. Shapley {method}; "
        f"{record['n_images_per_coalition']} images per coalition ({record['prompts']} prompts x "
        f"{record['num_images']} seed(s), {record['steps']} steps, guidance {record['guidance']:g}).",
    ]
    if coalitions:
        lines += ["", f"| coalition | {unit} | U = D − D(base) | images |", "|---|---:|---:|---:|"]
        for row in record["coalitions"]:
            who = " + ".join(row["members"]) or "(base only)"
            lines.append(f"| {who} | {row['D']:.2f} | {row['U']:+.2f} | {row['n_images']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ command


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `jaxdiff evaluate copyscope` flags."""
    p.add_argument("--base", default="shapes", help="the base pipeline: 'shapes', a jaxdiff or diffusers folder")
    p.add_argument(
        "--components",
        nargs="+",
        required=True,
        metavar="NAME=PATH",
        help="the players: model folders of the base's architecture (an erase OUT or OUT/model, a fine-tune) or "
        "SPM adapter folders (OUT/adapter); each contributes its weight delta from the base",
    )
    p.add_argument("--reference", required=True, help="a folder of reference images, or a statistics .npz")
    p.add_argument("--prompts", required=True, help="a text file, one prompt per line (the same for every coalition)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, else 25)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's, else 7.5)")
    p.add_argument(
        "--permutations",
        type=int,
        default=0,
        help=f"0: exact Shapley over all 2^n coalitions (n <= {MAX_EXACT_PLAYERS}); K: sample K player orders",
    )
    p.add_argument("--permutation-seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="images per coalition (default ~/.cache/jaxdiff/copyscope)")
    p.add_argument("--inception", help="FID instead of the shapes probe's FD: the FID Inception weights")
    p.add_argument("--mode", default="pytorch-fid", help="FID preprocessing: pytorch-fid, clean-fid, torch-fidelity")
    p.add_argument("--batch-size", type=int, default=50, help="FID: images per compiled Inception call")
    p.add_argument("--out", help="write the JSON record here (atomic); without it the record is printed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_components(items: Sequence[str]) -> dict[str, str]:
    """["name=path", ...] -> {name: path}, in order; one clear error for a malformed or repeated name."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--components takes NAME=PATH, got {item!r}")
        if name in out:
            raise UserError(f"component name {name!r} given twice")
        out[name] = path
    return out


def run(args) -> int:
    components = parse_components(args.components)
    _check_players(list(components), args.permutations)
    record = attribute(
        args.base,
        components,
        args.reference,
        ev.read_prompts(args.prompts),
        num_images=args.num_images,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        permutations=args.permutations,
        permutation_seed=args.permutation_seed,
        cache=args.cache,
        inception=args.inception,
        mode=args.mode,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    text = json.dumps(record, indent=2)
    print(markdown(record))
    if args.out:
        fileio.atomic_write_text(args.out, text + "\n")
    else:
        print(text)
    return 0
