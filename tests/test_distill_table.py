"""tools/distill_table.py: every method's training flags apply to its config; the diversity and verdict helpers."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import distill_table as dt  # noqa: E402

from jaxdiff.config import apply_overrides, load_config  # noqa: E402


@pytest.mark.parametrize("method", [m.name for m in dt.BUDGETS + dt.LONG_BUDGETS])
def test_budget_flags_apply_to_the_config(method, tmp_path):
    """A misspelt override (a key the config lacks) would fail here rather than after an hour of other training."""
    m = dt.BY_NAME[method]
    cmd = dt.train_command(m, tmp_path)
    config_arg = cmd[cmd.index("--config") + 1]
    overrides = [a for a in cmd if a.startswith("--config.")]
    c = apply_overrides(load_config(config_arg), overrides)
    assert int(c.train.steps) == int(next(f for f in m.flags if "train.steps" in f).split("=")[1])
    if "pairs" in c:  # the teacher's pairs at its default guidance, or a 2-RF's own (no CFG)
        guidance = dt.GUIDANCE if c.pairs.source == "teacher" else 1.0
        assert str(c.pairs.folder) == str(tmp_path / m.pairs) and float(c.pairs.guidance) == guidance
    if m.after:
        assert str(c.init) == str(tmp_path / m.after / "model")
    if m.perceptual_probe:
        assert str(c.rectified_flow.loss) == "distill_probe"
        assert str(c.rectified_flow.probe) == str(dt.perceptual_probe_path(tmp_path))


def test_the_perceptual_probe_is_trained_apart_from_the_judge(tmp_path):
    """Its command parses, trains the probe stage from another seed, and ships into the run folder, never into
    jaxdiff/assets where the judging probe lives."""
    import train_shapes

    cmd = dt.perceptual_probe_command(tmp_path)
    assert cmd[1] == "tools/train_shapes.py"
    args = train_shapes.parser().parse_args(cmd[2:])
    assert args.stage == "probe" and args.seed != 0
    assert dt.perceptual_probe_path(tmp_path) == Path(args.assets) / "shapes_probe"
    assert Path(args.assets).is_relative_to(tmp_path)


def test_the_methods_of_one_pair_store_share_its_key(tmp_path):
    keys = {}
    for m in dt.BUDGETS + dt.LONG_BUDGETS:
        cmd = dt.train_command(m, tmp_path)
        c = apply_overrides(load_config(cmd[cmd.index("--config") + 1]), [a for a in cmd if a.startswith("--config.")])
        if "pairs" in c and any(f.startswith("--config.pairs.") for f in m.flags):
            p = c.pairs
            model = m.after if p.source == "init" else "teacher"
            key = (model, p.scheduler, int(p.steps), float(p.guidance), p.seed, p.shard_size, c.data.num_prompts)
            keys.setdefault(m.pairs, set()).add((key, int(p.num_pairs)))
    assert sorted(keys) == ["pairs", "pairs_2rf_8192", "pairs_8192", "pairs_dpm4_32768"]
    assert all(len(k) == 1 for k in keys.values())  # the store is tied to its prompts, solver and shard size


def test_diversity_is_zero_for_repeated_images_and_grows_with_spread():
    class Probe:
        def __call__(self, images):
            return {}, images.reshape(len(images), -1)

    same = np.repeat(np.arange(6, dtype=np.float32).reshape(2, 1, 3), 4, axis=1).reshape(8, 3)
    assert dt._diversity(Probe(), same, 4) == 0.0
    rng = np.random.default_rng(0)
    small, large = rng.normal(size=(8, 3)), 10 * rng.normal(size=(8, 3))
    assert dt._diversity(Probe(), large, 4) > dt._diversity(Probe(), small, 4) > 0
