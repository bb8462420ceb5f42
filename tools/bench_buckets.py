#!/usr/bin/env python
"""Cold and warm start per resolution bucket: `jaxdiff generate --buckets` in a fresh process, first with an empty
persistent compilation cache (cold: every bucket compiles), then again with the cache it left (warm: every bucket
loads). Prints a markdown table of process wall-clock and bucket compile/load seconds.

  python tools/bench_buckets.py                                # shapes, buckets 32x32,64x32,64x64, 25 DDIM steps
  python tools/bench_buckets.py --model PATH --buckets 512x512,768x512 --steps 30
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--buckets", default="32x32,64x32,64x64", help="HEIGHTxWIDTH,... (default: %(default)s)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--prompt", default="a red circle")
    p.add_argument("--repeats", type=int, default=1, help="cold/warm pairs to run (the table shows the median)")
    return p


def run_once(args, cache_dir: str, out: str) -> tuple[float, dict[str, float]]:
    """(process seconds, {bucket: compile-or-load seconds}) of one generate run with `cache_dir`."""
    height, width = args.buckets.split(",")[0].lower().split("x")
    command = [
        sys.executable, "-m", "jaxdiff", "generate", args.prompt, "--model", args.model, "--steps", str(args.steps),
        "--buckets", args.buckets, "--height", height, "--width", width, "--quiet", "--out", out,
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(command, env={**os.environ, "JAXDIFF_CACHE_DIR": cache_dir}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"bench_sampling: generate failed:\n{result.stderr[-2000:]}")
    line = next(x for x in result.stdout.splitlines() if x.startswith("compiled "))
    return seconds, {m[0]: float(m[1]) for m in re.findall(r"(\d+x\d+) in ([0-9.]+) s", line)}


def main(argv=None) -> int:
    import numpy as np

    args = parser().parse_args(argv)
    cold, warm = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
            cold.append(run_once(args, cache, out))
            warm.append(run_once(args, cache, out))
    buckets = list(cold[0][1])
    print(f"model {args.model}, {args.steps} DDIM steps, 1 prompt, {args.repeats} cold/warm pair(s), median")
    print("| bucket | cold: compile s | warm: load s | speed-up |")
    print("|---|---:|---:|---:|")
    for b in buckets:
        c, w = np.median([r[1][b] for r in cold]), np.median([r[1][b] for r in warm])
        print(f"| {b} | {c:.2f} | {w:.2f} | {c / max(w, 1e-9):.1f}x |")
    c, w = np.median([r[0] for r in cold]), np.median([r[0] for r in warm])
    print(f"| whole process (all buckets + one image) | {c:.1f} | {w:.1f} | {c / w:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
