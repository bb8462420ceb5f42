"""GPU benchmark: the SD1.5 UNet forward, 50-step sampling and one training step, jaxdiff vs diffusers PyTorch.

    python tools/bench_gpu.py                      # on a CUDA GPU: SD1.5 config, random weights, 512², bf16
    python tools/bench_gpu.py --dry-run            # anywhere (CPU): a tiny config, 64², 2 steps: keeps it working
    python tools/bench_gpu.py --json bench_gpu.json --no-torch-compile

One random-weight SD1.5 pipeline (UNet, VAE, CLIP text encoder, a word-level tokenizer) is written as a diffusers
folder; each side then runs in its own process (JAX would otherwise preallocate the GPU memory PyTorch needs):
  1. UNet forward in bf16 at batch 1 and 4 (ms per call);
  2. the whole pipeline, 50 DDIM steps with classifier-free guidance, batch 1 (it/s = steps / seconds, text
     encoding and VAE decode included on both sides);
  3. one training step: denoising MSE, forward + backward + AdamW, float32 master weights and bf16 compute
     (img/s and peak device memory; `tools/bench_train.py` times the trainer's full step).
PyTorch runs with SDPA attention and, on CUDA, also `torch.compile` on a channels-last UNet (reported as its own
column; a compile failure is reported, not fatal). One table is printed at the end.

On a machine without network (the lent GPU machines): diffusers and ml_collections are pure-Python wheels;
`pip download diffusers ml_collections --no-deps -d wheels/` here, carry `wheels/`, and
`pip install --no-index --no-deps wheels/*.whl` there. Anchors (A100-80G, SD1.5 512², 50 steps, batch 1):
diffusers SDPA 31 it/s, torch.compile + channels-last 47 it/s, stable-fast 55 it/s.
"""

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

CLIP_SD15 = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu")  # fmt: skip
VAE_SD = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)  # fmt: skip
# --dry-run: the same program structure at a size a 2-core CPU runs in seconds.
UNET_TINY = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                 cross_attention_dim=32, attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))  # fmt: skip
VAE_TINY = dict(block_out_channels=[16, 32], layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2)  # fmt: skip
CLIP_TINY = dict(vocab_size=60, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                 max_position_embeddings=77)  # fmt: skip
PROMPT = "a b c d"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dry-run", action="store_true", help="tiny config at 64², 2 steps, on whatever device is here")
    p.add_argument("--resolution", type=int, default=None, help="image size (default 512; --dry-run 64)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 50; --dry-run 2)")
    p.add_argument("--forward-batches", default="1,4", help="UNet forward batch sizes")
    p.add_argument("--train-batch", type=int, default=4, help="images per training step")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per figure (default 10; --dry-run 2)")
    p.add_argument("--no-torch", action="store_true", help="jaxdiff only")
    p.add_argument("--no-torch-compile", action="store_true", help="skip the torch.compile + channels-last column")
    p.add_argument("--json", help="also write the results here (atomically)")
    p.add_argument("--side", choices=("build", "jax", "torch"), help=argparse.SUPPRESS)  # child process mode
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.resolution = args.resolution or (64 if args.dry_run else 512)
    args.steps = args.steps or (2 if args.dry_run else 50)
    args.repeats = args.repeats or (2 if args.dry_run else 10)
    args.forward_batches = [int(b) for b in str(args.forward_batches).split(",")]
    return args


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (compile, autotune, allocator)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------ the pipeline


def build_pipeline(folder: str, dry_run: bool) -> None:
    """A random-weight SD1.5-config (or tiny) diffusers pipeline with a word-level CLIP tokenizer, saved to folder."""
    import torch
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    sys.path.insert(0, ROOT)
    from jaxdiff.models.unet import SD15_CONFIG

    torch.manual_seed(0)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({f"{w}</w>": i + 2 for i, w in enumerate("abcdefghijklmnopqrstuvwxyz")})
    os.makedirs(folder + "_vocab", exist_ok=True)
    with open(os.path.join(folder + "_vocab", "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder + "_vocab", "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(
        os.path.join(folder + "_vocab", "vocab.json"),
        os.path.join(folder + "_vocab", "merges.txt"),
        model_max_length=77,
    )
    clip = dict(CLIP_TINY if dry_run else CLIP_SD15, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**(VAE_TINY if dry_run else VAE_SD)),
        text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**(UNET_TINY if dry_run else {**SD15_CONFIG, "sample_size": 64})),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)


# ----------------------------------------------------------------------------------------------------- jaxdiff


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    sys.path.insert(0, ROOT)
    from jaxdiff.sampling.pipeline import load_pipeline

    pipe = load_pipeline(args.folder, dtype=jnp.bfloat16)
    unet = pipe.unet
    lat = args.resolution // 8
    ctx_dim = unet.config["cross_attention_dim"]
    rng = np.random.default_rng(0)
    out = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "version": jax.__version__}
    forward = jax.jit(unet.apply)
    for b in args.forward_batches:
        x = jnp.asarray(rng.standard_normal((b, lat, lat, 4)), jnp.float32)
        t = jnp.full((b,), 500.0)
        ctx = jnp.asarray(rng.standard_normal((b, 77, ctx_dim)), jnp.float32)
        s = median_time(lambda x=x, t=t, ctx=ctx: forward(unet.params, x, t, ctx).block_until_ready(), args.repeats)
        out[f"forward_b{b}_ms"] = 1e3 * s

    def sample():
        pipe([PROMPT], steps=args.steps, guidance=7.5, height=args.resolution, width=args.resolution)

    out["sampling_it_s"] = args.steps / median_time(sample, max(1, args.repeats // 3))

    b = args.train_batch
    alphas = jnp.cumprod(1.0 - jnp.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    tx = optax.adamw(1e-5, weight_decay=1e-2)

    def loss_fn(params, latents, ctx, key):
        k1, k2 = jax.random.split(key)
        noise = jax.random.normal(k1, latents.shape)
        t = jax.random.randint(k2, (latents.shape[0],), 0, 1000)
        a = alphas[t][:, None, None, None]
        noisy = jnp.sqrt(a) * latents + jnp.sqrt(1 - a) * noise
        pred = unet.apply(params, noisy, t.astype(jnp.float32), ctx)
        return jnp.mean((pred.astype(jnp.float32) - noise) ** 2)

    @jax.jit
    def train_step(params, opt_state, latents, ctx, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, latents, ctx, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    train_step = jax.jit(train_step.__wrapped__, donate_argnums=(0, 1))
    state = {"params": jax.tree_util.tree_map(jnp.copy, unet.params)}
    state["opt"] = tx.init(state["params"])
    latents = jnp.asarray(rng.standard_normal((b, lat, lat, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((b, 77, ctx_dim)), jnp.float32)

    def step():
        state["params"], state["opt"], loss = train_step(state["params"], state["opt"], latents, ctx,
                                                         jax.random.PRNGKey(0))  # fmt: skip
        loss.block_until_ready()

    out["train_images_per_s"] = b / median_time(step, args.repeats)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_memory_gb"] = stats["peak_bytes_in_use"] / 2**30
    return out


# ----------------------------------------------------------------------------------------------------- PyTorch


def run_torch(args) -> dict:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "version": torch.__version__}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    pipe = StableDiffusionPipeline.from_pretrained(args.folder, torch_dtype=torch.bfloat16, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    lat = args.resolution // 8
    ctx_dim = pipe.unet.config.cross_attention_dim
    g = torch.Generator().manual_seed(0)

    def forward_times(unet, tag):
        for b in args.forward_batches:
            x = torch.randn(b, 4, lat, lat, generator=g).to(device, torch.bfloat16)
            t = torch.full((b,), 500, device=device)
            ctx = torch.randn(b, 77, ctx_dim, generator=g).to(device, torch.bfloat16)

            def call(x=x, t=t, ctx=ctx):
                with torch.no_grad():
                    unet(x, t, ctx)
                sync()

            out[f"forward_b{b}_ms{tag}"] = 1e3 * median_time(call, args.repeats)

    def sample():
        with torch.no_grad():
            pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=7.5, height=args.resolution,
                 width=args.resolution, output_type="np")  # fmt: skip
        sync()

    forward_times(pipe.unet, "")
    out["sampling_it_s"] = args.steps / median_time(sample, max(1, args.repeats // 3))
    if cuda and not args.no_torch_compile:
        try:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
            forward_times(pipe.unet, "_compiled")
            out["sampling_it_s_compiled"] = args.steps / median_time(sample, max(1, args.repeats // 3))
        except Exception as e:  # noqa: BLE001 - reported in the table, the other figures still count
            out["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        pipe.unet = pipe.unet._orig_mod if hasattr(pipe.unet, "_orig_mod") else pipe.unet

    unet = pipe.unet.to(torch.float32).to(memory_format=torch.contiguous_format).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2)
    alphas = torch.cumprod(1.0 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2, 0).to(device)
    b = args.train_batch
    latents = torch.randn(b, 4, lat, lat, generator=g).to(device)
    ctx = torch.randn(b, 77, ctx_dim, generator=g).to(device)
    pipe = None  # frees the bf16 copies before the training step's float32 state
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (b,), device=device)
        a = alphas[t][:, None, None, None]
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with torch.autocast(device, dtype=torch.bfloat16):
            pred = unet(noisy, t, ctx).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()

    out["train_images_per_s"] = b / median_time(step, args.repeats)
    if cuda:
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# -------------------------------------------------------------------------------------------------------- main


def child(args, side: str, folder: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--side", side, "--folder", folder]
    argv += ["--resolution", str(args.resolution), "--steps", str(args.steps), "--repeats", str(args.repeats)]
    argv += ["--forward-batches", ",".join(map(str, args.forward_batches)), "--train-batch", str(args.train_batch)]
    argv += ["--dry-run"] * args.dry_run + ["--no-torch-compile"] * args.no_torch_compile
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    result = subprocess.run(argv, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"bench_gpu: the {side} side failed:\n{result.stderr[-3000:]}")
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def table(args, jx: dict, pt: dict | None) -> str:
    def cell(d, key, fmt):
        return "—" if not d or key not in d else fmt.format(d[key])

    rows = [(f"UNet forward, batch {b} (ms)", f"forward_b{b}_ms", "{:.1f}", False) for b in args.forward_batches]
    rows += [(f"{args.steps}-step sampling, batch 1 (it/s)", "sampling_it_s", "{:.2f}", True),
             (f"train step, batch {args.train_batch} (img/s)", "train_images_per_s", "{:.2f}", True),
             ("train peak memory (GiB)", "peak_memory_gb", "{:.2f}", False)]  # fmt: skip
    lines = [
        f"jaxdiff {jx.get('version')} on {jx.get('device')} vs PyTorch {(pt or {}).get('version', '—')}: "
        f"{'tiny config (dry run)' if args.dry_run else 'SD1.5 config'}, random weights, {args.resolution}², bf16",
        "",
        "| | jaxdiff | PyTorch (SDPA) | torch.compile + channels-last | jaxdiff / best PyTorch |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, key, fmt, higher_better in rows:
        compiled_key = key.replace("_ms", "_ms_compiled") if key.endswith("_ms") else key + "_compiled"
        ref = [v for v in ((pt or {}).get(key), (pt or {}).get(compiled_key)) if v is not None]
        ratio = "—"
        if ref and key in jx and key != "peak_memory_gb":
            best = max(ref) if higher_better else min(ref)
            ratio = f"{(jx[key] / best) if higher_better else (best / jx[key]):.2f}x"
        lines.append(
            f"| {label} | {cell(jx, key, fmt)} | {cell(pt, key, fmt)} | {cell(pt, compiled_key, fmt)} | {ratio} |"
        )
    if pt and "compile_error" in pt:
        lines.append(f"\ntorch.compile failed: {pt['compile_error']}")
    lines.append(
        "\nratio > 1: jaxdiff is faster (forward: PyTorch ms / jaxdiff ms; others: jaxdiff rate / PyTorch rate)"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.side == "build":
        build_pipeline(args.folder, args.dry_run)
        return 0
    if args.side:
        print(json.dumps(run_jax(args) if args.side == "jax" else run_torch(args)))
        return 0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "sd15")
        child(args, "build", folder)
        jx = child(args, "jax", folder)
        pt = None if args.no_torch else child(args, "torch", folder)
    text = table(args, jx, pt)
    print(text)
    print(f"\n({time.perf_counter() - t0:.0f} s in all)")
    if args.json:
        sys.path.insert(0, ROOT)
        from jaxdiff import fileio

        fileio.atomic_write_text(args.json, json.dumps({"args": vars(args), "jaxdiff": jx, "torch": pt}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
