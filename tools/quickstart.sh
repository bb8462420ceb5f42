#!/usr/bin/env bash
# From zero to images: a .venv with the pinned versions (no torch needed), then the main job on `shapes`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e .
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.jax_cache}"
.venv/bin/jaxdiff generate "a red circle" "a blue square on the left" "a yellow triangle on a black background" \
    "a green disc on the left and a red box on the right" --steps 25 --seed 0 --out out/ "$@"
echo "open out/grid.png (each image, and out/generate.json with prompt, seed, steps, scheduler and model)"
# Erase a concept from the same model and measure it with the shapes probe (before/after grid + report).
.venv/bin/jaxdiff erase --config configs/erase/uce.py:shapes --config.concept=box --config.preserve="circle;triangle" \
    --out out/erase_box --overwrite
echo "open out/erase_box/before_after.png and out/erase_box/report.md (the edited model is out/erase_box/model)"
