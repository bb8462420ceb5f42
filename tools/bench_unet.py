"""Benchmark the SD1.5-config UNet forward and forward+backward: jaxdiff vs diffusers PyTorch in the same run."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--resolution", type=int, default=256, help="image size in pixels (latents are 1/8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--repeats", type=int, default=5, help="timed steady-state calls per measurement")
    p.add_argument("--attention", default="auto", help="jaxdiff attention implementation")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--no-backward", action="store_true", help="time the forward pass only")
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


def timeit(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from jaxdiff.models.model import create
    from jaxdiff.models.unet import ARCHITECTURES

    config = dict(cross_attention_dim=768, sample_size=args.resolution // 8)
    lat = args.resolution // 8
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, lat, lat, 4)).astype(np.float32)
    t = np.full((args.batch,), 500.0, np.float32)
    ctx = rng.standard_normal((args.batch, 77, 768)).astype(np.float32)
    results = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), **vars(args)}

    model = create(ARCHITECTURES["UNet2DConditionModel"], config, abstract=False, dtype=dtype, attention=args.attention)
    params = model.params
    print(
        f"jaxdiff UNet: {model.num_params():,} params, latents {lat}x{lat}, batch {args.batch}, {args.dtype}, "
        f"backend {jax.default_backend()}",
        flush=True,
    )

    fwd = jax.jit(model.apply)
    t0 = time.perf_counter()
    fwd_c = fwd.lower(params, x, t, ctx).compile()
    results["jax_forward_compile_s"] = time.perf_counter() - t0
    fwd_c(params, x, t, ctx).block_until_ready()
    results["jax_forward_s"] = timeit(lambda: fwd_c(params, x, t, ctx).block_until_ready(), args.repeats)

    if not args.no_backward:

        def loss(p):
            return jnp.mean(jnp.square(model.apply(p, x, t, ctx).astype(jnp.float32)))

        grad = jax.jit(jax.value_and_grad(loss))
        t0 = time.perf_counter()
        grad_c = grad.lower(params).compile()
        results["jax_backward_compile_s"] = time.perf_counter() - t0
        jax.block_until_ready(grad_c(params))
        results["jax_forward_backward_s"] = timeit(lambda: jax.block_until_ready(grad_c(params)), args.repeats)

    if not args.no_torch:
        import torch
        from diffusers import UNet2DConditionModel

        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
        ref = UNet2DConditionModel(**config).to(device=device, dtype=torch_dtype)
        tx = torch.from_numpy(x).permute(0, 3, 1, 2).to(device, torch_dtype)
        tt = torch.from_numpy(t).to(device)
        tc = torch.from_numpy(ctx).to(device, torch_dtype)

        def sync():
            if device == "cuda":
                torch.cuda.synchronize()

        def torch_fwd():
            with torch.no_grad():
                ref(tx, tt, tc)
            sync()

        torch_fwd()
        results["torch_forward_s"] = timeit(torch_fwd, args.repeats)
        if not args.no_backward:

            def torch_bwd():
                ref.zero_grad(set_to_none=True)
                ref(tx, tt, tc).sample.float().square().mean().backward()
                sync()

            torch_bwd()
            results["torch_forward_backward_s"] = timeit(torch_bwd, args.repeats)
        results["torch_threads"] = torch.get_num_threads()

    print(
        f"compile: forward {results['jax_forward_compile_s']:.1f} s"
        + (
            f", forward+backward {results['jax_backward_compile_s']:.1f} s"
            if "jax_backward_compile_s" in results
            else ""
        )
    )
    for what in ("forward", "forward_backward"):
        j = results.get(f"jax_{what}_s")
        if j is None:
            continue
        line = f"{what:>16}: jaxdiff {j * 1e3:8.1f} ms"
        tr = results.get(f"torch_{what}_s")
        if tr:
            results[f"ratio_{what}"] = j / tr
            line += f"   diffusers/torch {tr * 1e3:8.1f} ms   ratio jaxdiff/torch {j / tr:5.2f}"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
