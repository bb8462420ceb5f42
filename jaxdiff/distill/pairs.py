"""Teacher ODE solves as one compiled program and the pair store (noise z0 -> teacher latent z1) in npz shards.

    solver = make_solver(pipe, "ddim", steps=25, guidance=5.0)      # one jitted program: denoise.denoise inside
    z1 = solver(unet_params, z0, cond, uncond)
    store = PairStore.open(folder, key, shard_size, prompts)         # refuses a folder keyed otherwise
    store.fill(num_pairs, make_shard)                                # resumable: complete shards are kept
    pairs = store.load()                                             # {"z0", "z1", "prompt_index"}

Layout: FOLDER/meta.json (the key: teacher params digest, solver, steps, guidance, seed, latent shape, prompts
digest; shard size; the prompts) and FOLDER/shard_00000.npz ... (z0 [S, h, w, c] unit Gaussian noise, z1 the
teacher's final latent as the pipeline decodes it, prompt_index [S]). Every file is written atomically
(`jaxdiff.fileio`), so a shard that exists is complete: a killed run continues from the next missing shard, and
shard k's noise and prompts are a pure function of (seed, k), so a resumed store equals an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import fileio
from jaxdiff.errors import UserError
from jaxdiff.sampling import denoise, make_scheduler

META = "meta.json"


def make_solver(pipe, scheduler: str, steps: int, guidance: float) -> Callable:
    """jit(unet_params, z0 [B,h,w,c] unit noise, cond [B,L,D], uncond [B,L,D]) -> teacher latent [B,h,w,c]: the
    pipeline's own scheduler (DDIM, DPM-Solver++, Euler...) run by `denoise.denoise`, the one guided loop."""
    sched = make_scheduler(scheduler, pipe.scheduler_config)
    plan = sched.plan(int(steps))
    unet = pipe.unet

    def solve(unet_params, z0, cond, uncond):
        model = lambda x, t, c: unet.apply(unet_params, x, t, c).astype(jnp.float32)  # noqa: E731
        x = z0.astype(jnp.float32) * plan.init_noise_sigma
        return denoise.denoise(model, sched, plan, x, cond, uncond, jnp.float32(guidance))

    return jax.jit(solve)


def prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def shard_noise(seed: int, k: int, n: int, shape) -> np.ndarray:
    """Shard k's starting noise [n, *shape]: a pure function of (seed, k)."""
    return np.random.default_rng([seed, 1717, k]).standard_normal((n, *shape)).astype(np.float32)


def shard_prompts(seed: int, k: int, n: int, num_prompts: int) -> np.ndarray:
    return np.random.default_rng([seed, 2323, k]).integers(0, num_prompts, size=n).astype(np.int32)


class PairStore:
    """A folder of npz shards of (z0, z1, prompt_index) written by one teacher with one solver setting."""

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = Path(folder), meta

    @classmethod
    def open(cls, folder, key: dict, shard_size: int, prompts: list[str]) -> PairStore:
        """Open (or create) the store keyed by `key`; a folder written with another key is refused in one line,
        before anything is written."""
        folder = Path(folder)
        key = dict(key, prompts_sha256=prompts_digest(prompts))
        meta = {"key": key, "shard_size": int(shard_size), "prompts": list(prompts)}
        path = folder / META
        if path.is_file():
            saved = json.loads(path.read_text())
            diff = [
                f"{k}: {saved['key'].get(k)!r} -> {key.get(k)!r}"
                for k in sorted(set(saved["key"]) | set(key))
                if saved["key"].get(k) != key.get(k)
            ]
            if saved.get("shard_size") != int(shard_size):
                diff.append(f"shard_size: {saved.get('shard_size')} -> {shard_size}")
            if diff:
                raise UserError(
                    f"pair store {folder} was written by another teacher or solver setting ({'; '.join(diff)}); "
                    "use another pairs folder"
                )
            return cls(folder, saved)
        if folder.exists() and any(folder.iterdir()):
            raise UserError(f"{folder} is not empty and holds no {META}: not a pair store; use another pairs folder")
        fileio.atomic_write_text(path, json.dumps(meta, indent=2) + "\n")
        return cls(folder, meta)

    @property
    def shard_size(self) -> int:
        return int(self.meta["shard_size"])

    def shard_path(self, k: int) -> Path:
        return self.folder / f"shard_{k:05d}.npz"

    def complete(self) -> list[int]:
        """Indices of the shards on disk (atomic writes: each is complete)."""
        return sorted(int(p.stem.split("_")[1]) for p in self.folder.glob("shard_*.npz"))

    def num_shards(self, num_pairs: int) -> int:
        return -(-int(num_pairs) // self.shard_size)

    def write_shard(self, k: int, arrays: dict[str, np.ndarray]) -> None:
        with fileio.atomic_file(self.shard_path(k), "wb") as f:
            np.savez(f, **{name: np.asarray(a) for name, a in arrays.items()})

    def fill(self, num_pairs: int, make_shard: Callable[[int], dict], progress: bool = False) -> int:
        """Write the missing shards of the first `num_pairs` pairs; returns how many shards were written now."""
        todo = [k for k in range(self.num_shards(num_pairs)) if not self.shard_path(k).is_file()]
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc="teacher pairs", unit="shard")
        for k in todo:
            self.write_shard(k, make_shard(k))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return len(todo)

    def load(self, num_pairs: int | None = None) -> dict[str, np.ndarray]:
        """The first `num_pairs` pairs (default: every complete shard), concatenated in shard order."""
        ks = self.complete() if num_pairs is None else range(self.num_shards(num_pairs))
        parts = []
        for k in ks:
            if not self.shard_path(k).is_file():
                raise UserError(f"pair store {self.folder}: shard {k} is missing (fill it first)")
            with np.load(self.shard_path(k)) as z:
                parts.append({name: z[name] for name in z.files})
        if not parts:
            raise UserError(f"pair store {self.folder} holds no shards")
        out = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        return out if num_pairs is None else {name: a[: int(num_pairs)] for name, a in out.items()}


def teacher_shard_fn(pipe, solver, contexts: np.ndarray, uncond: np.ndarray, seed: int, shard_size: int, shape):
    """make_shard(k) for `PairStore.fill`: shard k's noise and prompts (pure in (seed, k)) through the solver."""
    unet_params = pipe.unet.params

    def make(k: int) -> dict[str, np.ndarray]:
        z0 = shard_noise(seed, k, shard_size, shape)
        idx = shard_prompts(seed, k, shard_size, len(contexts))
        cond = jnp.asarray(contexts[idx])
        un = jnp.broadcast_to(jnp.asarray(uncond), cond.shape)
        z1 = np.asarray(solver(unet_params, jnp.asarray(z0), cond, un), np.float32)
        return {"z0": z0, "z1": z1, "prompt_index": idx}

    return make
