"""tools/bench_gpu.py stays runnable: its dry run (tiny config, CPU) builds the pipeline, runs both sides, prints
the table. No timing is asserted: speed lives in the benchmark's own output."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import bench_gpu  # noqa: E402


@pytest.mark.filterwarnings("ignore")
def test_dry_run_measures_every_figure_on_both_sides(tmp_path):
    args = bench_gpu.parse_args(["--dry-run", "--forward-batches", "1", "--train-batch", "1", "--steps", "1",
                                 "--repeats", "1", "--folder", str(tmp_path / "sd")])  # fmt: skip
    bench_gpu.build_pipeline(args.folder, dry_run=True)
    jx, pt = bench_gpu.run_jax(args), bench_gpu.run_torch(args)
    for side in (jx, pt):
        assert {"forward_b1_ms", "sampling_it_s", "train_images_per_s"} <= set(side), side
        assert all(side[k] > 0 for k in ("forward_b1_ms", "sampling_it_s", "train_images_per_s"))
    text = bench_gpu.table(args, jx, pt)
    assert "UNet forward, batch 1" in text and "1-step sampling" in text and text.count("x |") == 3
