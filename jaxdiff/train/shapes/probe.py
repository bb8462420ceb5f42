"""Stage probe: the judge of generated images (jaxdiff/metrics/probe.py: object count, per-slot shape / colour /
size, position), trained on real renders with mild noise; shipped to <assets>/shapes_probe."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from jaxdiff.metrics import probe as probe_lib
from jaxdiff.train.shapes import fit
from jaxdiff.train.shapes.common import Run, labels_of, ship, to_images
from jaxdiff.train.shapes.models import probe_config

LOGGED_ACCURACIES = ("shape0", "colour0", "shape1")


def stage(run: Run) -> dict:
    data, test = run.data("train"), run.data("test")
    batch_size = run.hp("probe", "batch")
    seed = run.opts.seed + 2
    cfg = probe_config(run.tiny)
    probe = probe_lib.init_probe(cfg, seed=seed)
    module = probe.module
    train_targets = probe_lib.targets(labels_of(data))

    def loss_fn(params, frozen, batch, rng):
        logits, _ = module.apply({"params": params["probe"]}, batch["x"])
        loss, accs = probe_lib.loss_fn(logits, batch["targets"])
        return loss, {k: v for k, v in accs.items() if k in LOGGED_ACCURACIES}

    def batch_fn(rng):
        idx = rng.integers(0, len(data["images"]), batch_size)
        x = to_images(data["images"][idx])
        # Mild noise and per-image brightness: decoded samples are never pixel-exact renders.
        x = x + rng.normal(0, 0.03, x.shape).astype(np.float32)
        x = x + rng.normal(0, 0.02, (batch_size, 1, 1, 1)).astype(np.float32)
        return {"x": np.clip(x, 0, 1), "targets": {k: v[idx] for k, v in train_targets.items()}}

    params, info = fit.train_one(
        run,
        "probe",
        "probe",
        loss_fn,
        probe.params,
        batch_fn,
        seed=seed,
        config={"probe": cfg, "examples": len(data["images"])},
    )
    probe = probe_lib.Probe(cfg, params)
    preds, _ = probe(test["images"])
    acc = probe_lib.accuracy(preds, probe_lib.targets(labels_of(test)))
    out = run.dir("probe") / "probe"
    probe.save(out)
    ship(out, Path(run.opts.assets) / "shapes_probe")
    worst = min(v for k, v in acc.items() if k != "all")
    if worst < 0.98:
        print(f"[probe] WARNING: a head is below 98% on the test split: {acc}", flush=True)
    return {
        **info,
        "batch": batch_size,
        "test_accuracy": acc,
        "test_examples": int(len(test["images"])),
        "params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(probe.params))),
    }
