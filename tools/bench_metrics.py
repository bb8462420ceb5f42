"""Benchmark FID feature extraction (images/s): jaxdiff's Flax Inception vs pytorch-fid's, in the same run.

    python tools/bench_metrics.py                        # 200 random 256x256 images, batch 50, this machine
    python tools/bench_metrics.py --reference-python /tmp/goldvenv/bin/python --images 500 --json out.json

Both sides run the same network (pytorch-fid's FID Inception-v3, random weights: speed does not depend on them) on
the same uint8 images held in memory, with pytorch-fid's preprocessing (bilinear resize to 299 inside the program),
so the figure is the network's throughput, not image decoding. jaxdiff's first batch (the compile) is timed apart.
pytorch-fid needs torchvision, which the test venv's torch lacks: it runs in the interpreter given by
--reference-python (the golden venv of tools/make_metric_goldens.py: torch 2.14.1, torchvision 0.29.1,
pytorch-fid 0.3.0). The machine's load average is printed beside the figures: other work on the cores skews both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_REFERENCE = "/tmp/goldvenv/bin/python"

# Runs in the reference interpreter: pytorch-fid's InceptionV3 (its FID blocks), weights from its own random init
# where it would download them; prints one JSON line.
_TORCH_SCRIPT = r"""
import json, os, sys, time
import numpy as np, torch
import pytorch_fid.inception as pfi

images = np.load(sys.argv[1])
batch, threads = int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
pfi.load_state_dict_from_url = lambda *a, **k: {k_: v for k_, v in net.state_dict().items()}
blocks = [("Mixed_5b", pfi.FIDInceptionA(192, 32)), ("Mixed_5c", pfi.FIDInceptionA(256, 64)),
          ("Mixed_5d", pfi.FIDInceptionA(288, 64)), ("Mixed_6b", pfi.FIDInceptionC(768, 128)),
          ("Mixed_6c", pfi.FIDInceptionC(768, 160)), ("Mixed_6d", pfi.FIDInceptionC(768, 160)),
          ("Mixed_6e", pfi.FIDInceptionC(768, 192)), ("Mixed_7b", pfi.FIDInceptionE_1(1280)),
          ("Mixed_7c", pfi.FIDInceptionE_2(2048))]
for name, block in blocks:
    setattr(net, name, block)
model = pfi.InceptionV3([3]).eval()
x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # what its ToTensor gives
with torch.no_grad():
    model(x[:batch])  # warm-up
    t = time.perf_counter()
    n = 0
    for start in range(0, len(x), batch):
        out = model(x[start:start + batch])[0]
        n += out.shape[0]
    seconds = time.perf_counter() - t
print(json.dumps({"images": n, "seconds": seconds, "torch": torch.__version__, "threads": threads}))
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--images", type=int, default=200, help="images per side")
    p.add_argument("--size", type=int, default=256, help="input image size (resized to 299 inside the network)")
    p.add_argument("--batch-size", type=int, default=50, help="images per call (pytorch-fid's default)")
    p.add_argument("--mode", default="pytorch-fid", help="jaxdiff preprocessing mode")
    p.add_argument(
        "--reference-python",
        default=DEFAULT_REFERENCE,
        help="interpreter with torch + torchvision + pytorch-fid ('' skips the reference)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def bench_jaxdiff(images: np.ndarray, batch_size: int, mode: str) -> dict:
    sys.path.insert(0, ROOT)
    import jax

    import jaxdiff
    from jaxdiff.metrics import fid

    model = jaxdiff.init_model({"_class_name": "FIDInceptionV3"}, abstract=False)
    t = time.perf_counter()
    fid.features(images[:batch_size], mode, model, batch_size=batch_size)  # compile + first batch
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    out = fid.features(images, mode, model, batch_size=batch_size)
    seconds = time.perf_counter() - t
    return {
        "images": len(out),
        "seconds": seconds,
        "compile_seconds": compile_s,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
    }


def bench_torch(images: np.ndarray, batch_size: int, python: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "images.npy")
        np.save(path, images)
        result = subprocess.run(
            [python, "-c", _TORCH_SCRIPT, path, str(batch_size), str(threads)], capture_output=True, text=True
        )
    if result.returncode != 0:
        raise SystemExit(f"the pytorch-fid reference failed ({python}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.reference_python and not os.path.exists(args.reference_python):
        raise SystemExit(
            f"--reference-python {args.reference_python} does not exist: create the golden venv "
            "(see tools/make_metric_goldens.py) or pass --reference-python '' to time jaxdiff alone"
        )
    images = np.random.default_rng(0).integers(0, 256, (args.images, args.size, args.size, 3), dtype=np.uint8)
    results = {
        "images": args.images,
        "size": args.size,
        "batch_size": args.batch_size,
        "load_before": os.getloadavg()[0],
    }
    jd = bench_jaxdiff(images, args.batch_size, args.mode)
    results["jaxdiff"] = {**jd, "images_per_s": jd["images"] / jd["seconds"]}
    print(
        f"jaxdiff ({jd['backend']}): {results['jaxdiff']['images_per_s']:.2f} img/s "
        f"({jd['images']} images in {jd['seconds']:.1f} s; compile {jd['compile_seconds']:.1f} s)",
        flush=True,
    )
    if args.reference_python:
        ref = bench_torch(images, args.batch_size, args.reference_python, args.threads)
        results["pytorch_fid"] = {**ref, "images_per_s": ref["images"] / ref["seconds"]}
        ratio = results["jaxdiff"]["images_per_s"] / results["pytorch_fid"]["images_per_s"]
        results["ratio_jaxdiff_over_pytorch_fid"] = ratio
        print(
            f"pytorch-fid (torch {ref['torch']}, {ref['threads']} threads): "
            f"{results['pytorch_fid']['images_per_s']:.2f} img/s ({ref['images']} images in {ref['seconds']:.1f} s)"
        )
        print(f"ratio jaxdiff / pytorch-fid: {ratio:.2f}x")
    results["load_after"] = os.getloadavg()[0]
    print(
        f"load average: {results['load_before']:.1f} before, {results['load_after']:.1f} after ({os.cpu_count()} cores)"
    )
    if args.json:
        sys.path.insert(0, ROOT)
        from jaxdiff import fileio

        fileio.atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
