"""Benchmark training-free caches (Faster Diffusion, DeepCache, T-GATE): wall-clock per image vs plain sampling in
the same run, and quality deltas on `shapes` (FD on probe features, probe and pixel-judge accuracies)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = {
    # faster:* decode step by step on a CPU ("auto"); the official batched form is listed beside it
    50: ["faster:50ls", "faster:50ls:decode=parallel", "faster:every2", "deepcache:3", "tgate:10"],
    25: ["faster:every2", "deepcache:3", "tgate:10"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, nargs="+", default=[50, 25], help="step counts to run (default: 50 25)")
    p.add_argument("--cache", action="append", help="schedules to run at every step count (default: per count)")
    p.add_argument("--n", type=int, default=64, help="images per schedule (single-object test scenes)")
    p.add_argument("--batch", type=int, default=32, help="images per pipeline call")
    p.add_argument("--guidance", type=float, default=2.0, help="default: the shapes teacher's (2.0)")
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--boots", type=int, default=200, help="bootstrap resamples for the FD intervals")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--repeats", type=int, default=3, help="--sd-like: interleaved timing rounds (median reported)")
    p.add_argument(
        "--sd-like",
        action="store_true",
        help="instead: time the denoising loop alone (no VAE, no quality) of an SD1.5-shaped UNet with random "
        "weights at reduced width (block_out_channels 64/128/256/256, cross-attention 768, 32x32 latents)",
    )
    return p.parse_args(argv)


SD_LIKE = {"block_out_channels": (64, 128, 256, 256), "cross_attention_dim": 768, "sample_size": 32}


def sd_like(args) -> int:
    """Wall-clock of the compiled loop per image for an SD1.5-shaped UNet with random weights (CFG rows)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.models.model import create
    from jaxdiff.models.unet import ARCHITECTURES, SD15_CONFIG
    from jaxdiff.sampling import cache as cache_lib
    from jaxdiff.sampling import make_scheduler
    from jaxdiff.sampling.denoise import denoise

    model = create(ARCHITECTURES["UNet2DConditionModel"], {**SD15_CONFIG, **SD_LIKE}, abstract=False)
    sched = make_scheduler(
        args.scheduler,
        {
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "steps_offset": 1,
            "clip_sample": False,
        },
    )
    rng = np.random.default_rng(0)
    b = args.batch
    x = jnp.asarray(rng.standard_normal((b, 32, 32, 4)).astype(np.float32))
    cond = (jnp.asarray(rng.standard_normal((b, 77, 768)).astype(np.float32)), None)
    uncond = (jnp.asarray(rng.standard_normal((b, 77, 768)).astype(np.float32)), None)
    rows, fns = [], []
    for steps in args.steps:
        plan = sched.plan(steps)
        for spec in [None] + (args.cache or DEFAULT.get(steps, DEFAULT[25])):
            schedule = cache_lib.parse(spec, np.asarray(plan.timesteps), model.module.num_skips)

            @jax.jit
            def fn(params, x, cond, uncond, schedule=schedule, plan=plan):
                unet = cache_lib.CachedUNet(model.module, params)
                return denoise(unet, sched, plan, x, cond, uncond, args.guidance, cache=schedule)

            t = time.perf_counter()
            fn(model.params, x, cond, uncond).block_until_ready()
            passes = steps if schedule is None else schedule.encoder_passes()
            rows.append(
                {
                    "steps": steps,
                    "cache": spec or "none",
                    "compile_s": time.perf_counter() - t,
                    "encoder_passes": passes,
                    "times": [],
                }
            )
            fns.append(fn)
    # Interleaved rounds (every schedule once per round), the median per schedule: a load that drifts during the
    # run touches every schedule alike, so the ratios hold on a busy machine too.
    for _ in range(args.repeats):
        for row, fn in zip(rows, fns):
            t = time.perf_counter()
            fn(model.params, x, cond, uncond).block_until_ready()
            row["times"].append((time.perf_counter() - t) / b)
    for row in rows:
        row["s_per_image"] = float(np.median(row["times"]))
        print(json.dumps(row), flush=True)
    print(
        f"\nSD1.5-shaped UNet at reduced width {SD_LIKE}, random weights, batch {b} (x2 CFG rows), median of "
        f"{args.repeats} interleaved rounds, load {os.getloadavg()}"
    )
    print("| steps | cache | encoder passes | s/image (loop only) | speed-up |\n|---|---|---|---|---|")
    for r in rows:
        plain = next(p for p in rows if p["steps"] == r["steps"] and p["cache"] == "none")
        print(
            f"| {r['steps']} | {r['cache']} | {r['encoder_passes']} | {r['s_per_image']:.3f} | "
            f"{plain['s_per_image'] / r['s_per_image']:.2f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def main(argv=None):
    args = parse_args(argv)
    sys.path.insert(0, ROOT)
    if args.sd_like:
        return sd_like(args)
    import numpy as np

    from jaxdiff.data import shapes as S
    from jaxdiff.metrics import evaluate, pixel_judge
    from jaxdiff.metrics import probe as probe_lib
    from jaxdiff.sampling import cache as cache_lib
    from jaxdiff.sampling import make_scheduler
    from jaxdiff.sampling.pipeline import load_pipeline

    pipe = load_pipeline("shapes")
    real, labels, scenes = pixel_judge.render_split(args.n, "test", num_objects=1)
    rng = np.random.default_rng(0)
    prompts = [S.caption(s, rng, "train") for s in scenes]
    real_feats = evaluate.probe_features(real)
    probe = probe_lib.load_probe()
    results = {"n": args.n, "batch": args.batch, "scheduler": args.scheduler, "load": os.getloadavg(), "rows": []}

    def quality(images):
        pred, _ = probe(images)
        probe_acc = probe_lib.accuracy(pred, probe_lib.targets(labels))
        judge_acc = pixel_judge.accuracy(pixel_judge.judge(images, expected_objects=1), labels)
        fd, interval = evaluate.frechet_with_interval(real_feats, evaluate.probe_features(images), args.boots)
        pick = lambda acc: {k: acc[k] for k in ("shape0", "colour0") if k in acc}  # noqa: E731
        return {"fd": fd, "fd_interval": interval, "probe": pick(probe_acc), "judge": pick(judge_acc)}

    def generate(steps, cache):
        images, seconds = [], 0.0
        for b, start in enumerate(range(0, args.n, args.batch)):
            batch = prompts[start : start + args.batch]
            kw = dict(steps=steps, guidance=args.guidance, scheduler=args.scheduler, seed=b, cache=cache)
            if b == 0:
                t = time.perf_counter()
                pipe(batch, **kw)  # compile (not timed per image)
                compile_s = time.perf_counter() - t
            t = time.perf_counter()
            images.append(pipe(batch, **kw))
            seconds += time.perf_counter() - t
        return np.concatenate(images), seconds / args.n, compile_s

    for steps in args.steps:
        plan = np.asarray(make_scheduler(args.scheduler, pipe.scheduler_config).plan(steps).timesteps)
        plain, plain_s, plain_c = generate(steps, None)
        base = quality(plain)
        row = {
            "steps": steps,
            "cache": "none",
            "s_per_image": plain_s,
            "compile_s": plain_c,
            "speedup": 1.0,
            "encoder_passes": steps,
            **base,
        }
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        for spec in args.cache or DEFAULT.get(steps, DEFAULT[25]):
            schedule = cache_lib.parse(spec, plan, pipe.unet.module.num_skips)
            images, s, c = generate(steps, spec)
            q = quality(images)
            row = {
                "steps": steps,
                "cache": spec,
                "s_per_image": s,
                "compile_s": c,
                "speedup": plain_s / s,
                "encoder_passes": schedule.encoder_passes(),
                "max_pixel_delta_vs_plain": float(np.abs(images - plain).max()),
                "mean_pixel_delta_vs_plain": float(np.abs(images - plain).mean()),
                **q,
            }
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
    results["load_after"] = os.getloadavg()

    print(f"\nshapes, {args.scheduler}, guidance {args.guidance}, n = {args.n} per row, batch {args.batch}")
    print(
        "| steps | cache | encoder passes | s/image | speed-up | FD (probe) [95% CI] | probe shape/colour | "
        "judge shape/colour |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        ci = r["fd_interval"]
        ci = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
        acc = lambda a: "/".join(f"{v:.2f}" for v in a.values())  # noqa: E731
        print(
            f"| {r['steps']} | {r['cache']} | {r['encoder_passes']} | {r['s_per_image'] * 1e3:.1f} ms | "
            f"{r['speedup']:.2f}x | {r['fd']:.2f}{ci} | {acc(r['probe'])} | {acc(r['judge'])} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
