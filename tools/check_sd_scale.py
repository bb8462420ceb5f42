"""Erasure at Stable Diffusion 1.5 scale (random weights): time every closed-form edit on the 32 cross-attention K/V
matrices and compile one training step of every fine-tuning objective, printing time and memory. Not in CI.

    python tools/check_sd_scale.py                      # everything (the compiles take minutes on a CPU)
    python tools/check_sd_scale.py --only closed        # the closed-form edits only (needs ~4 GB RAM)
    python tools/check_sd_scale.py --only train --methods esd,spm

Closed form: the UNet is created with random weights (`create(..., abstract=False)`, ~3.4 GB float32); prompts
are random 77x768 "text embeddings" with realistic token counts. Each edit is timed twice: "cold" (first call,
XLA compilation included) and "warm" (a second call). Training: each objective's step (loss, gradient, optax
update) is lowered with abstract shapes (`jax.ShapeDtypeStruct`, no weights in memory) and compiled; the compiled
program's own memory estimate is printed next to the process's peak RSS (resource.getrusage).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CLOSED = ("uce", "uce-paper", "rece", "trce1", "mace", "mace-fuse")
TRAIN = ("esd-x", "esd-u", "spm", "trce2", "doco", "all_but_one", "ablation")


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def report(name: str, **fields):
    parts = [f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()]
    print(f"{name:14s} " + "  ".join(parts), flush=True)


# ------------------------------------------------------------------------------------------ closed form


def random_encoded(rng, n, words=(1, 6), L=77, D=768, scale=1.0):
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.erase.common import Encoded

    lengths = rng.integers(words[0], words[1] + 1, size=n) + 2
    ids = np.full((n, L), 49407, np.int32)
    for i, m in enumerate(lengths):
        ids[i, 0] = 49406
        ids[i, 1 : m - 1] = rng.integers(300, 40000, size=m - 2)
    emb = rng.standard_normal((n, L, D)).astype(np.float32) * scale
    return Encoded(jnp.asarray(emb), ids, lengths.astype(np.int32), tuple(f"p{i}" for i in range(n)))


def check_closed_form(methods, seed: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.erase import mace, rece, ridge, trce, uce
    from jaxdiff.models import unet
    from jaxdiff.models.model import create

    t0 = time.perf_counter()
    model = create(unet.ARCHITECTURES["UNet2DConditionModel"], unet.SD15_CONFIG, abstract=False, seed=seed)
    params = model.params
    jax.block_until_ready(params)
    mats = ridge.get_kv(params)
    shapes = sorted({tuple(w.shape) for w in mats.values()})
    report(
        "unet",
        params_M=model.num_params() / 1e6,
        kv_matrices=len(mats),
        shapes=str(shapes),
        seconds=time.perf_counter() - t0,
        peak_rss_GB=peak_gb(),
    )
    rng = np.random.default_rng(seed)
    concept, guide = random_encoded(rng, 1), random_encoded(rng, 1, (0, 0))
    preserve = random_encoded(rng, 3)
    # A caption cache with the magnitude of MACE/TRCE's COCO cache (~9M token vectors): Σ c cᵀ rescaled.
    rows = rng.standard_normal((4096, 768)).astype(np.float32)
    cache = jnp.asarray(rows.T @ rows * (9e6 / 4096))

    cases = {
        "uce": lambda: uce.uce(params, concept, guide, preserve),
        "uce-paper": lambda: uce.uce(
            params, concept, guide, preserve, edit_tokens="last_word_to_end", preserve_tokens="all", preserve_scale=0.25
        ),
    }
    neutral = random_encoded(rng, 1)
    start_point = {}  # RECE starts from a UCE edit, made (untimed) when RECE's turn comes
    cases["rece"] = lambda: rece.rece(
        start_point["uce"], params, concept.emb, neutral.emb[0], neutral.emb, epochs=1, reg=1e-3
    )
    old, new = random_encoded(rng, 300, (2, 8)), random_encoded(rng, 300, (4, 8))  # 20 concepts x 15 templates
    cases["trce1"] = lambda: trce.eot_mapping(params, old, new, cache, preserve_scale=0.01)
    m_old, m_new = random_encoded(rng, 32, (3, 8)), random_encoded(rng, 32, (3, 8))
    cases["mace"] = lambda: mace.cfr(params, m_old, m_new, cache)
    deltas = [
        {n: jnp.asarray(rng.standard_normal(w.shape).astype(np.float32) * 1e-3) for n, w in mats.items()}
        for _ in range(2)
    ]
    cases["mace-fuse"] = lambda: mace.fuse(params, deltas, [m_old.emb[:8], m_old.emb[8:16]], cache)
    results = {}
    for name in methods:
        if name not in cases:
            continue
        if name == "rece":
            start_point["uce"] = uce.uce(params, concept, guide)[0]
        times = []
        for _ in range(2):
            start = time.perf_counter()
            out, _ = cases[name]()
            jax.block_until_ready(out)
            times.append(time.perf_counter() - start)
        changed = sum(not bool(jnp.array_equal(a, b)) for a, b in zip(ridge.get_kv(out).values(), mats.values()))
        results[name] = times
        report(
            name,
            cold_s=times[0],
            warm_s=times[1],
            matrices_changed=changed,
            under_3s=times[1] < 3.0,
            peak_rss_GB=peak_gb(),
        )
    return results


# --------------------------------------------------------------------------------------------- training


def abstract(tree):
    import jax

    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def check_training(methods, attention: str, batch: int, latent: int, fast: bool):
    import jax
    import jax.numpy as jnp
    import optax

    from jaxdiff import selectors
    from jaxdiff.erase import ablation, all_but_one, doco, esd, finetune, spm, trce
    from jaxdiff.models import unet
    from jaxdiff.models.model import create
    from jaxdiff.train import state as state_lib
    from jaxdiff.train import step as step_lib

    model = create(unet.ARCHITECTURES["UNet2DConditionModel"], unet.SD15_CONFIG, abstract=True, attention=attention)
    params = model.params  # ShapeDtypeStructs: nothing allocated
    shape = (latent, latent, 4)
    S = jax.ShapeDtypeStruct
    ctx = S((batch, 77, 768), jnp.float32)
    lat = S((batch, *shape), jnp.float32)
    key = jax.random.PRNGKey(0)
    options = {"xla_backend_optimization_level": 0} if fast else None

    def step_of(loss, opt):  # the runner's step over one network, as `jaxdiff erase` compiles it
        return [step_lib.Network("unet", opt)], finetune.single_loss(loss)

    def setup(name):
        adam = optax.adam(1e-5)
        if name in ("esd-x", "esd-u"):
            loss = esd.make_loss(model, latent_shape=shape)
            trainable = selectors.split(params, name)[0]
            return step_of(loss, adam), trainable, {"base": params}, {"cond": ctx, "uncond": ctx}, adam
        if name == "spm":
            loss = spm.make_loss(model, latent_shape=shape)
            ads = abstract(spm.init_adapters(params))  # reads only the shapes of the abstract params
            opt = optax.adamw(1e-4)
            return (
                step_of(loss, opt),
                ads,
                {"base": params},
                {"target": ctx, "positive": ctx, "surrogate": ctx, "uncond": ctx},
                opt,
            )
        if name == "trce2":
            loss = trce.make_stage2_loss(model)
            opt = trce.stage2_optimizer()
            b = {
                "x": lat,
                "t": S((batch,), jnp.int32),
                "safe": ctx,
                "neg": ctx,
                "uncond": ctx,
                "x_u": S((4, *shape), jnp.float32),
                "t_u": S((4,), jnp.int32),
                "uncond_u": S((4, 77, 768), jnp.float32),
            }
            return step_of(loss, opt), selectors.split(params, "trce")[0], {"base": params, "reg": params}, b, opt
        if name == "all_but_one":
            loss = all_but_one.make_loss(model, latent_shape=shape)
            return (
                step_of(loss, adam),
                selectors.split(params, "xattn")[0],
                {"base": params},
                {"cond": ctx, "alt": ctx, "uncond": ctx},
                adam,
            )
        if name == "ablation":
            loss = ablation.make_loss(model)
            b = {"latents": lat, "target": ctx, "anchor": ctx}
            return step_of(loss, adam), selectors.split(params, "cross-attn-kv")[0], {"base": params}, b, adam
        raise KeyError(name)

    for name in methods:
        start = time.perf_counter()
        if name == "doco":
            method = doco.DoCo(model)
            disc = jax.eval_shape(lambda k: method.init_disc(k, shape), key)
            trainable = selectors.split(params, "cross-attn-kv")[0]
            networks, phases = (
                [step_lib.Network("unet", optax.adamw(6e-6)), step_lib.Network("disc", optax.adam(1e-4))],
                method.phases(),
            )
            trainables = {"unet": trainable, "disc": disc}
            b = {"latents": lat, "target": ctx, "anchor": ctx, "prior_latents": lat, "prior": ctx}
            frozen = {"base": params}
        else:
            (networks, phases), trainable, frozen, b, _ = setup(name)
            trainables = {"unet": trainable}
        nets = {n.name: n for n in networks}
        masks = {k: jax.tree_util.tree_map(lambda _: True, v) for k, v in trainables.items()}
        state = jax.eval_shape(
            lambda p: state_lib.create(p, {k: n.tx for k, n in nets.items()}, masks, seed=0), trainables
        )
        fn = jax.jit(step_lib.build(nets, phases, masks), compiler_options=options, donate_argnums=(0,))
        lowered = fn.lower(state, b, frozen)
        t_lower = time.perf_counter() - start
        compiled = lowered.compile()
        t_compile = time.perf_counter() - start - t_lower
        mem = compiled.memory_analysis()
        n_train = sum(x.size for x in jax.tree_util.tree_leaves(trainables))
        fields = dict(trainable_M=n_train / 1e6, lower_s=t_lower, compile_s=t_compile)
        if mem is not None:
            fields.update(
                args_GB=mem.argument_size_in_bytes / 1e9,
                temp_GB=mem.temp_size_in_bytes / 1e9,
                out_GB=mem.output_size_in_bytes / 1e9,
            )
        fields["peak_rss_GB"] = peak_gb()
        report(name, **fields)
        del compiled, lowered


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("closed", "train"), help="run one half only")
    parser.add_argument("--methods", default="", help=f"comma-separated subset of {CLOSED + TRAIN}")
    parser.add_argument(
        "--attention",
        default="xla",
        help="UNet attention implementation for the training "
        "programs (xla: one fused op per layer; 'auto' picks the chunked CPU kernel, a much larger program)",
    )
    parser.add_argument("--batch", type=int, default=1, help="training batch (official ESD/SPM/TRCE: 1)")
    parser.add_argument("--latent", type=int, default=64, help="latent height/width (64 = 512 px)")
    parser.add_argument("--fast-compile", action="store_true", help="compile without XLA optimisations (quicker)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    chosen = [m for m in args.methods.split(",") if m] or list(CLOSED + TRAIN)
    unknown = set(chosen) - set(CLOSED + TRAIN)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {CLOSED + TRAIN}")
    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} CPUs)", flush=True)
    if args.only != "train":
        check_closed_form([m for m in chosen if m in CLOSED], args.seed)
    if args.only != "closed":
        check_training([m for m in chosen if m in TRAIN], args.attention, args.batch, args.latent, args.fast_compile)


if __name__ == "__main__":
    main()
