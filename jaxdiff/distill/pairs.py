"""Teacher ODE solves as one compiled program and the pair store (noise z0 -> teacher latent z1) in npz shards.

    solver = make_solver(pipe, "ddim", steps=25, guidance=5.0)      # one jitted program: denoise.denoise inside
    z1 = solver(unet_params, z0, cond, uncond)
    solver = make_solver(pipe, "tsit5", 0, 5.0, rtol=1e-3, atol=1e-3)  # adaptive (diffrax), `steps` ignored
    z1, stats = solver.with_stats(unet_params, z0, cond, uncond)     # stats: per-sample "nfe", "num_steps"
    store = PairStore.open(folder, key, shard_size, prompts)         # refuses a folder keyed otherwise
    store.fill(num_pairs, make_shard)                                # resumable: complete shards are kept
    pairs = store.load()                                             # {"z0", "z1", "prompt_index"}

Layout: FOLDER/meta.json (the key: teacher params digest, solver, steps, guidance, seed, latent shape, prompts
digest; shard size; the prompts) and FOLDER/shard_00000.npz ... (z0 [S, h, w, c] unit Gaussian noise, z1 the
teacher's final latent as the pipeline decodes it, prompt_index [S]; adaptive solvers add nfe [S] and num_steps [S],
see `solver_summary`). Every file is written atomically
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


# RectifiedFlow's uniform Euler (σ_i = 1 − i/N; InstaFlow's pipeline, `rectified_flow.uniform_plan`) for a
# flow-velocity model such as a 2-rectified flow: what InstaFlow's distillation stage solves (`pairs.source="init"`).
RF_EULER = "rf_euler"
ADAPTIVE = ("tsit5", "dopri5")  # diffrax's Tsit5 and Dopri5 (RK45); `steps` is ignored for these
DEFAULT_RTOL = DEFAULT_ATOL = 1e-3
# Tsit5 and Dopri5 are FSAL with 7 stages: 6 new evaluations per attempted step (accepted or rejected) and one at
# the start (diffrax's initial step-size guess reuses it; checked in tests/test_distill_pairs_adaptive.py).
_EVALS_PER_STEP = {"tsit5": 6, "dopri5": 6}


def make_solver(
    pipe, scheduler: str, steps: int, guidance: float, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL
) -> Callable:
    """jit(unet_params, z0 [B,h,w,c] unit noise, cond [B,L,D], uncond [B,L,D]) -> teacher latent [B,h,w,c].

    Fixed-step schedulers ("ddim", "dpm++2m", "euler", "flow_euler", ...; "rf_euler": flow Euler on RectifiedFlow's
    uniform grid): the pipeline's own scheduler run by
    `denoise.denoise`, the one guided loop, for `steps` steps. Adaptive solvers (`ADAPTIVE`: "tsit5", "dopri5"):
    `adaptive_solver`, which ignores `steps` and takes `rtol`/`atol`; its `with_stats` also returns the number of
    function evaluations."""
    if scheduler in ADAPTIVE:
        return adaptive_solver(pipe, scheduler, guidance, rtol, atol)
    if scheduler == RF_EULER:  # a flow-velocity model's own sampler, as its students are judged with
        from jaxdiff.distill.rectified_flow import uniform_plan

        sched, plan = make_scheduler("flow_euler", pipe.scheduler_config), uniform_plan(int(steps))
    else:
        sched = make_scheduler(scheduler, pipe.scheduler_config)
        plan = sched.plan(int(steps))
    unet = pipe.unet

    def solve(unet_params, z0, cond, uncond):
        model = lambda x, t, c: unet.apply(unet_params, x, t, c).astype(jnp.float32)  # noqa: E731
        x = z0.astype(jnp.float32) * plan.init_noise_sigma
        # A guidance of exactly 1 (a flow student's own ODE, `pairs.source="init"`) runs the conditional rows only.
        g = 1.0 if float(guidance) == 1.0 else jnp.float32(guidance)
        return denoise.denoise(model, sched, plan, x, cond, uncond, g)

    return jax.jit(solve)


def _diffrax():
    try:
        import diffrax
    except ImportError as e:
        raise UserError(
            "pairs.scheduler 'tsit5' / 'dopri5' (adaptive teacher ODE solvers) need diffrax, an optional dependency: "
            'pip install -e ".[distill]" (or pip install "diffrax>=0.7.2,<0.8"); the fixed-step schedulers '
            "(ddim, dpm++2m, euler) need nothing more"
        ) from e
    return diffrax


class AdaptiveSolver:
    """The teacher's probability-flow ODE integrated by diffrax (Tsit5 or Dopri5 with a PID step-size controller),
    one compiled program; each sample has its own step sizes (the solve is vmapped), so a pair's z1 depends only on
    its noise and prompt.

    VP teachers (ε / v / x0 prediction, `alphas_cumprod`): in the variables x = latents / α, σ = σ_t / α_t (the
    VE / EDM form) the ODE is dx/dσ = ε̂(x / √(σ² + 1), t(σ)); it is integrated in s = log σ, dx/ds = σ ε̂, which
    spreads the steps evenly over the noise scales (on the Gaussian teacher of tests/test_distill_pairs_adaptive.py
    Tsit5 at rtol = atol = 1e-3 has 10x less error and ~20 % fewer evaluations than in σ). ε̂ = u + g (c − u) on the
    UNet's outputs (as `denoise.denoise`; their conversion to ε is affine, so guiding before or after it agrees),
    t(σ) by log-linear interpolation of the training sigmas (diffusers' `_sigma_to_t`). From σ_max = the sigma of
    timestep T − 1 (where the fixed-step schedulers start from x_T = z0, so x(σ_max) = z0 √(σ_max² + 1)) down to
    σ_min = the sigma of timestep 0, then the x0 prediction there, x − σ_min ε̂ (one more evaluation; DPM-Solver++'s
    last step to σ = 0 is the same denoising step). Flow teachers (FlowMatch): dx/dσ = u(x, σ T), σ = 1 (x = z0) to 0.

    NFE (guided evaluations; each runs the UNet on the cond and uncond rows, 2 rows per sample, unless guidance
    is 1) = 6 · num_steps + 1 (Tsit5 / Dopri5 are FSAL), + 1 for the VP x0 prediction; num_steps counts accepted
    and rejected steps (diffrax's `stats["num_steps"]`).
    """

    def __init__(self, pipe, method: str, guidance: float, rtol: float, atol: float, max_steps: int = 4096):
        from jaxdiff.distill import teacher as teacher_lib

        if method not in ADAPTIVE:
            raise UserError(f"unknown adaptive solver {method!r} ({', '.join(ADAPTIVE)})")
        if not (float(rtol) > 0 and float(atol) > 0):
            raise UserError(f"pairs.rtol and pairs.atol must be positive, got {rtol}, {atol}")
        dfx = _diffrax()
        self.method, self.guidance, self.rtol, self.atol = method, float(guidance), float(rtol), float(atol)
        teacher = teacher_lib.Teacher(None, dict(pipe.scheduler_config))
        self.prediction_type = teacher.prediction_type
        unet = pipe.unet
        use_cfg = self.guidance != 1.0
        g = jnp.float32(self.guidance)
        T = int(pipe.scheduler_config.get("num_train_timesteps", 1000))
        if teacher.is_flow:
            sigma_max, sigma_min, log_sigmas = 1.0, 0.0, None
        else:
            acp = np.asarray(teacher.alphas_cumprod(), np.float64)
            with np.errstate(divide="ignore"):
                sig = np.sqrt((1.0 - acp) / acp)
            if not np.all(np.isfinite(sig)) or sig[0] <= 0:
                raise UserError(
                    "adaptive teacher solvers need finite, positive sigmas at every training timestep (a zero-SNR "
                    "schedule, rescale_betas_zero_snr, has none at T − 1); use a fixed-step scheduler"
                )
            sigma_max, sigma_min = float(sig[-1]), float(sig[0])
            log_sigmas = jnp.asarray(np.log(sig), jnp.float32)
        self.sigma_max, self.sigma_min = sigma_max, sigma_min
        steps_t = jnp.arange(T, dtype=jnp.float32)

        def guided(unet_params, x, t, ctx):
            """ε̂ (VP) or the flow velocity at the model input x [h, w, c], timestep t; ctx [2 or 1, L, D]."""
            xb = jnp.broadcast_to(x, (ctx.shape[0], *x.shape))
            out = unet.apply(unet_params, xb, jnp.full((ctx.shape[0],), t, jnp.float32), ctx).astype(jnp.float32)
            return out[1] + g * (out[0] - out[1]) if use_cfg else out[0]

        def to_eps(out, x_in, sigma):
            alpha = 1.0 / jnp.sqrt(sigma * sigma + 1.0)
            return teacher_lib.to_x0_eps(out[None], x_in[None], alpha, sigma * alpha, self.prediction_type)[1][0]

        def eps_hat(sigma, x, unet_params, ctx):
            t = jnp.interp(jnp.log(sigma), log_sigmas, steps_t)
            x_in = x / jnp.sqrt(sigma * sigma + 1.0)
            return to_eps(guided(unet_params, x_in, t, ctx), x_in, sigma)

        def vector_field(s, x, args):  # flow: s = σ; VP: s = log σ
            unet_params, ctx = args
            if log_sigmas is None:
                return guided(unet_params, x, s * T, ctx)
            sigma = jnp.exp(s)
            return sigma * eps_hat(sigma, x, unet_params, ctx)

        solver = {"tsit5": dfx.Tsit5, "dopri5": dfx.Dopri5}[method]()
        controller = dfx.PIDController(rtol=self.rtol, atol=self.atol)

        def one(unet_params, z0, ctx):
            x = z0.astype(jnp.float32) * (1.0 if log_sigmas is None else np.sqrt(sigma_max**2 + 1.0))
            sol = dfx.diffeqsolve(
                dfx.ODETerm(vector_field),
                solver,
                t0=sigma_max if log_sigmas is None else float(np.log(sigma_max)),
                t1=sigma_min if log_sigmas is None else float(np.log(sigma_min)),
                dt0=None,
                y0=x,
                args=(unet_params, ctx),
                stepsize_controller=controller,
                saveat=dfx.SaveAt(t1=True),
                max_steps=int(max_steps),
            )
            x = sol.ys[0]
            n = jnp.asarray(sol.stats["num_steps"], jnp.int32)
            nfe = _EVALS_PER_STEP[method] * n + 1
            if log_sigmas is not None:  # the x0 prediction at σ_min
                x = x - sigma_min * eps_hat(jnp.float32(sigma_min), x, unet_params, ctx)
                nfe = nfe + 1
            return x, {"nfe": nfe, "num_steps": n}

        def solve(unet_params, z0, cond, uncond):
            ctx = jnp.stack([cond, uncond], axis=1) if use_cfg else cond[:, None]
            return jax.vmap(one, in_axes=(None, 0, 0))(unet_params, z0, ctx)

        self._solve = jax.jit(solve)

    def with_stats(self, unet_params, z0, cond, uncond):
        """(teacher latents [B, h, w, c], {"nfe": [B], "num_steps": [B]})."""
        return self._solve(unet_params, z0, cond, uncond)

    def __call__(self, unet_params, z0, cond, uncond):
        return self._solve(unet_params, z0, cond, uncond)[0]


def adaptive_solver(pipe, method: str, guidance: float, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL):
    """`AdaptiveSolver` (a UserError when diffrax is not installed)."""
    return AdaptiveSolver(pipe, method, guidance, rtol, atol)


def solver_settings(pairs_config) -> dict:
    """The solver keywords of a config's `pairs` block that `make_solver` takes and the store's key must hold: {}
    for the fixed-step schedulers (their keys stay as they were), {"rtol", "atol"} for the adaptive ones
    (`pairs.rtol` / `pairs.atol`, absent: `DEFAULT_RTOL` / `DEFAULT_ATOL`; the configs' "tsit5" variant adds them).
    `pairs.steps` is ignored by the adaptive solvers."""
    p = pairs_config
    if str(p.scheduler) not in ADAPTIVE:
        return {}
    return {"rtol": float(p.get("rtol", DEFAULT_RTOL)), "atol": float(p.get("atol", DEFAULT_ATOL))}


def solver_summary(pairs: dict) -> dict:
    """NFE figures of an adaptive solver's pairs (`PairStore.load`'s dict): {"nfe_mean", "nfe_min", "nfe_max",
    "num_steps_mean"}; {} for fixed-step pairs (their NFE is `steps`)."""
    if "nfe" not in pairs:
        return {}
    nfe, n = np.asarray(pairs["nfe"], np.float64), np.asarray(pairs["num_steps"], np.float64)
    return {
        "nfe_mean": float(nfe.mean()),
        "nfe_min": int(nfe.min()),
        "nfe_max": int(nfe.max()),
        "num_steps_mean": float(n.mean()),
    }


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
        if isinstance(solver, AdaptiveSolver):  # also the per-sample NFE (`solver_summary`)
            z1, stats = solver.with_stats(unet_params, jnp.asarray(z0), cond, un)
            extra = {name: np.asarray(v, np.int32) for name, v in stats.items()}
        else:
            z1, extra = solver(unet_params, jnp.asarray(z0), cond, un), {}
        return {"z0": z0, "z1": np.asarray(z1, np.float32), "prompt_index": idx, **extra}

    return make
