"""Benchmark sampling: compiled-loop overhead vs bare UNet calls, compile time cold vs warm persistent cache,
and jaxdiff vs diffusers PyTorch end-to-end on the same pipeline."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="shapes", help="'shapes', a jaxdiff checkpoint or a diffusers pipeline folder")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch", type=int, default=4, help="prompts per call")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-torch", action="store_true", help="skip the diffusers reference")
    p.add_argument("--json", help="also write the results here")
    p.add_argument(
        "--buckets",
        metavar="HxW,...",
        help="instead: cold and warm start per resolution bucket (tools/bench_buckets.py) for these sizes",
    )
    p.add_argument("--first-call", metavar="CACHE_DIR", help=argparse.SUPPRESS)  # child process mode
    return p.parse_args(argv)


def first_call(args) -> None:
    """Child process: time-to-first-image with the persistent compilation cache in CACHE_DIR."""
    import jax

    jax.config.update("jax_compilation_cache_dir", args.first_call)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    sys.path.insert(0, ROOT)
    from jaxdiff.sampling.pipeline import load_pipeline

    pipe = load_pipeline(args.model)
    prompts = ["a red circle"] * args.batch
    t = time.perf_counter()
    pipe(prompts, steps=args.steps, guidance=args.guidance)
    first = time.perf_counter() - t
    t = time.perf_counter()
    pipe(prompts, steps=args.steps, guidance=args.guidance)
    print(json.dumps({"first_call_s": first, "second_call_s": time.perf_counter() - t}))


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    if args.first_call:
        return first_call(args)
    if args.buckets:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import bench_buckets

        return bench_buckets.main(["--model", args.model, "--buckets", args.buckets, "--steps", str(args.steps)])
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, ROOT)
    from jaxdiff.sampling import make_scheduler
    from jaxdiff.sampling.pipeline import load_pipeline

    pipe = load_pipeline(args.model)
    prompts = ["a red circle"] * args.batch
    results = {"model": args.model, "steps": args.steps, "batch": args.batch, "backend": jax.default_backend()}

    # 1. The whole loop (one compiled program) vs the same number of bare UNet calls.
    pipe(prompts, steps=args.steps, guidance=args.guidance)
    loop = median_time(lambda: pipe(prompts, steps=args.steps, guidance=args.guidance), args.repeats)
    sched = make_scheduler("ddim", pipe.scheduler_config)
    calls = sched.num_model_calls(sched.plan(args.steps))
    context, _ = pipe.encode_prompts(prompts + [""] * len(prompts))
    size = pipe.default_size // pipe.vae_scale_factor
    x = jnp.zeros((2 * args.batch, size, size, pipe.unet.config.get("in_channels", 4)))
    t = jnp.full((2 * args.batch,), 500.0)
    unet = jax.jit(pipe.unet.apply)
    unet(pipe.unet.params, x, t, context).block_until_ready()

    def bare():
        for _ in range(calls):
            unet(pipe.unet.params, x, t, context).block_until_ready()

    bare_s = median_time(bare, args.repeats)
    latents = jnp.zeros((args.batch, size, size, x.shape[-1]))
    decode = jax.jit(pipe.decode_latents)
    decode(pipe.vae.params, latents).block_until_ready()
    decode_s = median_time(lambda: decode(pipe.vae.params, latents).block_until_ready(), args.repeats)
    text_s = median_time(lambda: jax.block_until_ready(pipe.encode_prompts(prompts + [""] * len(prompts))), 3)
    results.update(
        loop_s=loop,
        bare_unet_calls_s=bare_s,
        vae_decode_s=decode_s,
        text_encode_s=text_s,
        per_step_loop_ms=1e3 * (loop - decode_s - text_s) / calls,
        per_step_bare_ms=1e3 * bare_s / calls,
    )
    results["loop_overhead"] = (loop - decode_s - text_s) / bare_s - 1

    # 2. Compile: a fresh process with an empty persistent cache, then another with the warm cache.
    with tempfile.TemporaryDirectory() as cache:
        child = [
            sys.executable,
            os.path.abspath(__file__),
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--guidance",
            str(args.guidance),
            "--first-call",
            cache,
        ]
        for label in ("cold", "warm"):
            out = subprocess.run(child, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            results[f"first_call_{label}_cache_s"] = json.loads(out)["first_call_s"]

    # 3. diffusers PyTorch end-to-end on the same weights (exported to a diffusers folder).
    if not args.no_torch:
        import torch
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        from jaxdiff.convert import checkpoint
        from jaxdiff.sampling.pipeline import resolve

        src = resolve(args.model)
        with tempfile.TemporaryDirectory() as tmp:
            if (src / checkpoint.JAXDIFF_INDEX).exists():  # a jaxdiff checkpoint: export it for diffusers
                checkpoint.export(src, os.path.join(tmp, "sd"))
                src = os.path.join(tmp, "sd")
            ref = StableDiffusionPipeline.from_pretrained(src, safety_checker=None)
        ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
        ref.set_progress_bar_config(disable=True)

        def torch_run():
            with torch.no_grad():
                ref(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, output_type="np")

        torch_run()
        results["torch_end_to_end_s"] = median_time(torch_run, args.repeats)
        results["ratio_end_to_end"] = loop / results["torch_end_to_end_s"]

    print(f"model {args.model}, {args.steps} DDIM steps ({calls} UNet calls), batch {args.batch} (x2 for CFG)")
    print(f"  compiled loop end-to-end   {loop * 1e3:8.1f} ms   ({results['per_step_loop_ms']:.2f} ms/step)")
    print(f"  bare UNet calls            {bare_s * 1e3:8.1f} ms   ({results['per_step_bare_ms']:.2f} ms/step)")
    print(f"  loop overhead vs bare calls {100 * results['loop_overhead']:+.1f} %")
    print(f"  first call, cold cache     {results['first_call_cold_cache_s']:8.2f} s")
    print(f"  first call, warm cache     {results['first_call_warm_cache_s']:8.2f} s")
    if "torch_end_to_end_s" in results:
        print(
            f"  diffusers PyTorch          {results['torch_end_to_end_s'] * 1e3:8.1f} ms   "
            f"ratio jaxdiff/torch {results['ratio_end_to_end']:.2f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
