"""Benchmark one training step of the SD1.5-config UNet (denoising loss, forward + backward + clip + AdamW):
jaxdiff's trainer step vs diffusers PyTorch, in the same run, each in its own subprocess (so that only one
framework's ~14 GB of float32 params, grads and Adam moments is resident at a time).

    python tools/bench_train.py                                   # CPU: 32x32 latents (256 px), batch 1, float32
    python tools/bench_train.py --resolution 512 --dtype bfloat16 --batch 8 --no-torch   # GPU: images/s and MFU

The jaxdiff step is exactly what `jaxdiff train --config configs/train/sd15.py` runs (EMA off, min-SNR on, the
non-finite guard included), compiled ahead of time: its compile time is reported separately. TFLOP/s come
from XLA's cost analysis of the compiled step; MFU divides them by --peak-tflops (known accelerators are
looked up by device kind).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense bf16 peak TFLOP/s per device, for model-FLOPs utilisation (vendor data sheets).
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=256, help="image size in pixels (latents are 1/8)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--repeats", type=int, default=5, help="timed steady-state steps")
    p.add_argument("--attention", default="auto", help="jaxdiff attention implementation")
    p.add_argument("--remat", choices=("none", "loss", "blocks"), default="none")
    p.add_argument(
        "--trainable",
        default="",
        help="train only params whose jaxdiff path and torch name contain "
        "this substring/regex (e.g. transformer_blocks), on both sides; default: all (the full step)",
    )
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: looked up by device kind)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--no-jax", action="store_true", help="skip jaxdiff")
    p.add_argument("--force", action="store_true", help="run even when free memory looks too small")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--framework", choices=("jax", "torch"), help=argparse.SUPPRESS)  # internal: one side only
    return p.parse_args(argv)


PARAMS = 859_520_964  # SD1.5 UNet parameters


def available_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def enough_memory(args, what: str) -> bool:
    """Params, 2 Adam moments, grads and the optimiser's update temporaries in float32 (~5 x 3.2 GB) plus
    activations; refuse rather than risk the OOM killer taking someone else's process."""
    share = 1.0 if not args.trainable else 0.3  # rough: the trainable fraction carries grads and Adam moments
    need = (1 + 4 * share) * PARAMS * 4 / 2**30 + 1.5 + 0.5 * args.batch * (args.resolution / 256) ** 2
    have = available_gb()
    if have is None or have >= need or args.force:
        return True
    print(f"{what}: skipped, needs ~{need:.0f} GB of RAM and {have:.1f} GB is available (--force to try)", flush=True)
    return False


def timeit(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run_jax(args) -> dict:
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.config import load_config
    from jaxdiff.train import config as config_lib
    from jaxdiff.train import loop, writer
    from jaxdiff.train import state as state_lib
    from jaxdiff.train import step as step_lib

    lat = args.resolution // 8
    config = load_config(os.path.join(ROOT, "configs", "train", "sd15.py:synthetic"))
    config = config_lib.apply_overrides(
        config,
        [
            f"--config.data.global_batch_size={args.batch}",
            f"--config.model.compute_dtype={args.dtype}",
            f"--config.model.attention={args.attention}",
            f"--config.train.remat={args.remat}",
            "--config.train.ema_decay=0.0",
            "--config.mesh.data=1",
            "--config.mesh.fsdp=1",
            f"--config.train.trainable={args.trainable}",
        ],
    )
    device = jax.devices()[:1]
    s = loop.setup(config, devices=device)
    rng = np.random.default_rng(0)
    host_batch = {
        "latents": rng.standard_normal((args.batch, lat, lat, 4)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((args.batch, 77, 768)).astype(np.float32),
    }
    abstract_batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s.batch_sharding) for k, v in host_batch.items()
    }
    options = step_lib.Options(remat=config.train.remat, batch_sharding=s.batch_sharding)
    step = step_lib.jit(step_lib.build(s.networks, s.phases, s.masks, options), s.state_shardings, s.batch_sharding)
    # Compile from shapes alone, before the ~10 GB state exists, so the compiler's memory never adds to it.
    t0 = time.perf_counter()
    compiled = step.lower(state_lib.abstract(s.abstract_state, s.state_shardings), abstract_batch, None).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    t0 = time.perf_counter()
    state = jax.jit(s.init_state, out_shardings=s.state_shardings)()
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    batch = {k: jax.device_put(v, s.batch_sharding) for k, v in host_batch.items()}
    flops = writer.flops_of(compiled)

    holder = {"state": state}

    def one():
        holder["state"], m = compiled(holder["state"], batch, None)
        jax.block_until_ready(m["loss"])
        holder["loss"] = float(m["loss"])

    one()  # warm-up
    seconds = timeit(one, args.repeats)
    kind = jax.devices()[0].device_kind
    out = {
        "jax_device": kind,
        "jax_backend": jax.default_backend(),
        "jax_params": s.model.num_params(),
        "jax_trainable_params": int(
            sum(
                np.prod(x.shape)
                for x in jax.tree_util.tree_leaves(
                    state_lib.partition(s.abstract_state.params["unet"], s.masks["unet"])[0]
                )
            )
        ),
        "jax_init_s": init_s,
        "jax_compile_s": compile_s,
        "jax_step_s": seconds,
        "jax_loss": holder["loss"],
        "jax_images_per_s": args.batch / seconds,
    }
    if memory is not None:
        out["jax_state_gb"] = memory.argument_size_in_bytes / 2**30
        out["jax_temp_gb"] = memory.temp_size_in_bytes / 2**30
    if flops:
        out["jax_step_tflop"] = flops / 1e12
        out["jax_tflops_per_s"] = flops / seconds / 1e12
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)
        if peak and jax.default_backend() != "cpu":
            out["jax_mfu"] = out["jax_tflops_per_s"] / peak
    del jnp
    return out


def run_torch(args) -> dict:
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    sys.path.insert(0, ROOT)
    from jaxdiff.models.unet import SD15_CONFIG

    lat = args.resolution // 8
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_CONFIG).to(device).train()
    if args.remat != "none":
        unet.enable_gradient_checkpointing()
    pattern = re.compile(args.trainable) if args.trainable else None
    trainable = [p for n, p in unet.named_parameters() if pattern is None or pattern.search(n)]
    for n, p in unet.named_parameters():
        p.requires_grad_(pattern is None or bool(pattern.search(n)))
    opt = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=1e-2)
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latents = torch.randn(args.batch, 4, lat, lat, device=device)
    context = torch.randn(args.batch, 77, 768, device=device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def one():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (args.batch,), device=device)
        noisy = sched.add_noise(latents, noise, t)
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            pred = unet(noisy, t, context).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return float(loss)

    one()  # warm-up (allocates the Adam moments)
    seconds = timeit(one, args.repeats)
    return {
        "torch_trainable_params": sum(p.numel() for p in trainable),
        "torch_device": device,
        "torch_threads": torch.get_num_threads(),
        "torch_step_s": seconds,
        "torch_images_per_s": args.batch / seconds,
        "torch_version": torch.__version__,
    }


def main(argv=None):
    args = parse_args(argv)
    if args.framework:  # one side, in this process; results as one JSON line on stdout
        if not enough_memory(args, args.framework):
            print(json.dumps({}))
            return 0
        result = run_jax(args) if args.framework == "jax" else run_torch(args)
        print(json.dumps(result))
        return 0

    results = {k: v for k, v in vars(args).items() if k not in ("framework", "json")}
    print(
        f"SD1.5 UNet train step: latents {args.resolution // 8}x{args.resolution // 8}, batch {args.batch}, "
        f"{args.dtype}, remat {args.remat}, trainable {args.trainable or 'all'}",
        flush=True,
    )
    own = [
        f"--resolution={args.resolution}",
        f"--batch={args.batch}",
        f"--dtype={args.dtype}",
        f"--repeats={args.repeats}",
        f"--attention={args.attention}",
        f"--remat={args.remat}",
    ]
    own += [f"--peak-tflops={args.peak_tflops}"] if args.peak_tflops else []
    own += ["--force"] if args.force else []
    own += [f"--trainable={args.trainable}"] if args.trainable else []
    for side, skip in (("jax", args.no_jax), ("torch", args.no_torch)):
        if skip:
            continue
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *own, "--framework", side], capture_output=True, text=True
        )
        if proc.returncode != 0:
            print(f"{side} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                print(line)
        results.update(json.loads(lines[-1]) if lines else {})

    if "jax_step_s" in results:
        print(
            f"jaxdiff: compile {results['jax_compile_s']:.1f} s (init {results['jax_init_s']:.1f} s), step "
            f"{results['jax_step_s'] * 1e3:.0f} ms, {results['jax_images_per_s']:.2f} images/s"
            + (
                f", {results['jax_tflops_per_s']:.3f} TFLOP/s ({results['jax_step_tflop']:.3f} TFLOP/step)"
                if "jax_tflops_per_s" in results
                else ""
            )
            + (f", MFU {100 * results['jax_mfu']:.1f}%" if "jax_mfu" in results else "")
            + f"  [{results['jax_device']}]"
        )
    if "torch_step_s" in results:
        print(
            f"diffusers/torch: step {results['torch_step_s'] * 1e3:.0f} ms, {results['torch_images_per_s']:.2f} "
            f"images/s  [{results['torch_device']}, {results['torch_threads']} threads]"
        )
    if "jax_step_s" in results and "torch_step_s" in results:
        results["ratio_jax_over_torch"] = results["jax_step_s"] / results["torch_step_s"]
        print(f"ratio jaxdiff/torch step time: {results['ratio_jax_over_torch']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
