"""Every shipped config loads: its default and every variant its own header names (a config that no longer imports
after a refactor fails here, not in a user's first run)."""

import glob
import os
import re

import pytest

from jaxdiff.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPERS = {"configs/distill/common.py"}  # shared settings imported by the method configs, no get_config()
CONFIGS = sorted(
    os.path.relpath(f, ROOT) for f in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
)


@pytest.mark.parametrize("path", [c for c in CONFIGS if c not in HELPERS])
def test_config_and_its_named_variants_load(path):
    text = open(os.path.join(ROOT, path)).read()
    variants = set(re.findall(re.escape(os.path.basename(path)) + r":([a-z0-9_,]+)", text))
    for variant in [""] + sorted(variants):
        config = load_config(os.path.join(ROOT, path) + (f":{variant}" if variant else ""))
        assert len(config) > 0, (path, variant)
