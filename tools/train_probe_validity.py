#!/usr/bin/env python
"""Trains the shapes probe's validity head and per-head temperatures on its frozen features; writes them beside it.

The probe's tower, features and heads stay as shipped (params.safetensors is only read). The validity head, a
small MLP on the frozen features and the heads' log-probabilities (jaxdiff/metrics/probe.py), learns real renders
(valid: one and two objects) against corrupted ones (invalid: every family of jaxdiff/data/corruptions.py), each
image shown clean, with mild noise (as the probe was trained) or through the shapes VAE (as samples are decoded),
so neither side is told apart by its texture. Corruptions for training and for the report come from disjoint seeds.
The temperatures minimise each head's NLL on a validation split of real renders and of the teacher's samples for
held-out-template prompts (labelled by their prompt); expected calibration error before/after is reported on
other seeds. Deterministic; a few minutes on 2 CPU cores.

  python tools/train_probe_validity.py        # writes validity.safetensors, calibration.json into the shipped probe
  python tools/train_probe_validity.py --n-real 600 --n-family 60 --n-teacher 0 --out /tmp/probe_validity
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from jaxdiff.data import corruptions as C  # noqa: E402
from jaxdiff.data import shapes as S  # noqa: E402
from jaxdiff.metrics import pixel_judge as J  # noqa: E402
from jaxdiff.metrics import probe as P  # noqa: E402

BASE = {"shapes": S.SHAPES, "colours": S.COLOURS}
AUGMENTATIONS = ("clean", "noise", "vae")
SEEDS = {"train": 0, "report": 1, "validation": 2}


class Augmenter:
    """Shows image i clean, with mild noise or through the VAE, by i mod 3 (deterministic per seed)."""

    def __init__(self, vae, seed: int):
        self.vae, self.seed = vae, seed

    def kinds(self, n: int) -> np.ndarray:
        return np.arange(n) % (3 if self.vae is not None else 2)

    def __call__(self, images: np.ndarray, batch: int = 250) -> np.ndarray:
        x = images.astype(np.float32) / 255.0
        kinds = self.kinds(len(x))
        rng = np.random.default_rng([self.seed, 31337])
        noisy = x + rng.normal(0, 0.03, x.shape).astype(np.float32) + rng.normal(0, 0.02, (len(x), 1, 1, 1))
        x = np.where((kinds == 1)[:, None, None, None], np.clip(noisy, 0, 1), x)
        idx = np.flatnonzero(kinds == 2)
        for i in range(0, len(idx), batch):
            part = idx[i : i + batch]
            x[part] = reconstruct(self.vae, x[part], batch)
        return x


def reconstruct(vae, x: np.ndarray, batch: int) -> np.ndarray:
    """VAE reconstructions (posterior mean) of x [N, H, W, 3] in [0, 1], padded to one compiled shape."""
    import jax
    import jax.numpy as jnp

    fn = reconstruct.__dict__.setdefault("fn", {}).get(id(vae))
    if fn is None:
        fn = reconstruct.fn[id(vae)] = jax.jit(lambda p, im: vae.decode(p, vae.encode(p, im * 2 - 1)[0]))
    pad = batch - len(x)
    xp = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)]) if pad > 0 else x
    return np.clip(np.asarray(fn(vae.params, jnp.asarray(xp))) / 2 + 0.5, 0, 1)[: len(x)]


def dataset(split: str, n_real: int, n_family: int, vae) -> dict:
    """Real renders (valid) and corrupted images (invalid) of one split, augmented, with their family names."""
    seed = SEEDS[split]
    real, labels = C.real(n_real, seed)
    images, asked, family = [real], [labels["num_objects"]], ["real"] * n_real
    for name in C.FAMILIES if n_family else ():
        ims, k = C.sample(name, n_family, seed)
        images.append(ims)
        asked.append(k)
        family += [name] * n_family
    raw = np.concatenate(images)
    aug = Augmenter(vae, seed)
    return {
        "raw": raw,
        "x": aug(raw),
        "asked": np.concatenate(asked),
        "family": np.array(family),
        "aug": np.array(AUGMENTATIONS)[aug.kinds(len(raw))],
        "real_labels": labels,
    }


def teacher_samples(pipe, n: int, num_objects: int, seed: int, steps: int, guidance: float, batch: int = 50):
    """The teacher's samples for `n` held-out-template prompts (as tools/judge_agreement.py): (uint8, labels)."""
    import eval_shapes

    from jaxdiff import images as imlib

    prompts, scenes = eval_shapes.heldout_prompts(n, num_objects, seed)
    chunks = []
    for b, start in enumerate(range(0, len(prompts), batch)):
        chunk = prompts[start : start + batch]
        pad = batch - len(chunk) if len(prompts) > batch else 0
        chunks.append(pipe(chunk + [chunk[-1]] * pad, steps=steps, guidance=guidance, seed=seed + b)[: len(chunk)])
    labs = [S.scene_labels(s) for s in scenes]
    return imlib.to_uint8(np.concatenate(chunks)), {k: np.stack([lab[k] for lab in labs]) for k in labs[0]}


def ece_table(logits: dict, tgt: dict, temps: dict) -> dict:
    """Per head: ECE (15 bins) at temperature 1 and at the fitted temperature, accuracy, n."""
    out = {}
    for name, lg in logits.items():
        keep = tgt[name] >= 0
        if not keep.any():
            continue
        correct = (np.argmax(lg, -1) == tgt[name])[keep]
        before = P.expected_calibration_error(P.softmax_confidence(lg[keep]), correct)
        after = P.expected_calibration_error(P.softmax_confidence(lg[keep], temps[name]), correct)
        out[name] = {"n": int(keep.sum()), "accuracy": float(correct.mean()), "ece_before": before, "ece_after": after}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-real", type=int, default=3000, help="real renders per split (train, report, validation)")
    p.add_argument("--n-family", type=int, default=300, help="corrupted images per family and split")
    p.add_argument("--n-teacher", type=int, default=100, help="teacher samples per kind (one, two objects) and split")
    p.add_argument("--model", default="shapes", help="pipeline whose VAE and teacher are used")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=25, help="DDIM steps of the teacher samples")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument("--threshold", type=float, default=0.5, help="validity probability at or above which valid")
    p.add_argument(
        "--max-false-invalid",
        type=float,
        default=0.008,
        help="lower the threshold until at most this fraction of the validation split's real renders is invalid",
    )
    p.add_argument("--no-vae", action="store_true", help="no VAE-reconstructed augmentation")
    p.add_argument("--probe", default=str(P.DEFAULT_PATH), help="probe folder (its existing files are only read)")
    p.add_argument("--out", default=None, help="folder to write to (default: the probe folder; else a copy of it)")
    args = p.parse_args(argv)

    import jax
    from tqdm import tqdm

    t0 = time.time()
    probe = P.load_probe(args.probe)
    out = Path(args.out) if args.out else Path(args.probe)
    if out.resolve() != Path(args.probe).resolve():
        out.mkdir(parents=True, exist_ok=True)
        for name in (P.CONFIG, P.PARAMS):
            shutil.copyfile(Path(args.probe) / name, out / name)
    before = {name: P.file_sha256(Path(args.probe) / name) for name in (P.CONFIG, P.PARAMS)}

    pipe = vae = None
    if not args.no_vae or args.n_teacher:
        from jaxdiff.sampling.pipeline import load_pipeline

        pipe = load_pipeline(args.model)
        vae = None if args.no_vae else pipe.vae

    bar = tqdm(total=8, desc="probe validity", unit="step")
    data = {}
    for split in ("train", "report", "validation"):
        bar.set_postfix_str(f"{split} images")
        d = data[split] = dataset(split, args.n_real, args.n_family if split != "validation" else 0, vae)
        d["logits"], d["feats"] = probe.logits(d["x"])
        d["inputs"] = P.validity_inputs(d["logits"], d["feats"])
        bar.update()

    bar.set_postfix_str("validity head")
    tr = data["train"]
    head = P.fit_validity(tr["inputs"], tr["family"] == "real", hidden=args.hidden, steps=args.train_steps)
    bar.update()

    teacher = {}
    if args.n_teacher:
        for split, seed in (("fit", 1000), ("report", 0)):
            bar.set_postfix_str(f"teacher samples ({split})")
            for k in (1, 2):
                ims, labels = teacher_samples(pipe, args.n_teacher, k, seed, args.steps, args.guidance)
                teacher[(split, k)] = (ims, labels, *probe.logits(ims))
            bar.update()
    else:
        bar.update(2)

    bar.set_postfix_str("temperatures")
    val = data["validation"]
    fit_logits = [val["logits"]] + [teacher[("fit", k)][2] for k in (1, 2) if ("fit", k) in teacher]
    fit_tgt = [P.targets(val["real_labels"])] + [P.targets(teacher[("fit", k)][1]) for k in (1, 2) if teacher]
    temps = {
        name: P.fit_temperature(
            np.concatenate([lg[name] for lg in fit_logits]), np.concatenate([t[name] for t in fit_tgt])
        )
        for name in P.HEADS
    }
    bar.update()

    val_prob = np.asarray(jax.nn.sigmoid(P.validity_logit(head, val["inputs"])))
    threshold = float(min(args.threshold, np.quantile(val_prob, args.max_false_invalid)))

    bar.set_postfix_str("report")
    judged = P.Probe(
        probe.config,
        probe.params,
        jax.tree_util.tree_map(np.asarray, head),
        {"temperatures": temps, "threshold": threshold},
    )
    rep = data["report"]
    prob = np.asarray(jax.nn.sigmoid(P.validity_logit(head, rep["inputs"])))
    valid = prob >= threshold
    families = {}
    for fam in ["real", *C.FAMILIES]:
        m = rep["family"] == fam
        rate = float(valid[m].mean()) if fam == "real" else float((~valid[m]).mean())
        per_aug = {a: float((valid if fam == "real" else ~valid)[m & (rep["aug"] == a)].mean()) for a in AUGMENTATIONS}
        families[fam] = {
            "n": int(m.sum()),
            "rate": rate,
            "by_augmentation": {a: v for a, v in per_aug.items() if v == v},
        }
    # The pixel judge on the same (clean) held-out images, for the side-by-side.
    pix = J.judge(rep["raw"], rep["asked"], **BASE)
    for fam in ["real", *C.FAMILIES]:
        m = rep["family"] == fam
        families[fam]["pixel_rate"] = float(pix["valid"][m].mean() if fam == "real" else (~pix["valid"][m]).mean())
    # Held-out concepts (not trained on): the probe cannot name them; how often does it call them valid?
    held, _ = C.real(args.n_family, SEEDS["report"], shapes=S.HELD_OUT_SHAPES, colours=S.ALL_COLOURS)
    held_valid = judged.judge(held)["valid"]
    test_images, test_labels, _ = J.render_split(1000, "test")
    test_verdicts = judged.judge(test_images, test_labels["num_objects"])
    report = {
        "families": families,
        "false_invalid_real": 1 - families["real"]["rate"],
        "real_test_split": {"n": len(test_images), "valid": float(test_verdicts["valid"].mean())},
        "held_out_shapes_called_valid": {"n": len(held), "rate": float(held_valid.mean())},
        "calibration": {},
    }
    real_report = rep["family"] == "real"
    report["calibration"]["real_report"] = ece_table(
        {k: v[real_report] for k, v in rep["logits"].items()}, P.targets(rep["real_labels"]), temps
    )
    if teacher:
        agree = {}
        for k in (1, 2):
            ims, labels, lg, _ = teacher[("report", k)]
            report["calibration"][f"teacher_{k}"] = ece_table(lg, P.targets(labels), temps)
            pv = judged.judge(ims, k)["valid"]
            xv = J.judge(ims, k, **BASE)["valid"]
            agree[k] = {
                "n": len(ims),
                "agreement": float((pv == xv).mean()),
                "probe_valid": float(pv.mean()),
                "pixel_valid": float(xv.mean()),
                "both_valid": int((pv & xv).sum()),
                "probe_only": int((pv & ~xv).sum()),
                "pixel_only": int((~pv & xv).sum()),
                "both_invalid": int((~pv & ~xv).sum()),
            }
        report["teacher_validity_agreement"] = agree
    bar.update()

    bar.set_postfix_str("write")
    meta = {
        "validity_inputs": "features + log_softmax of every head (HEADS order), standardised",
        "hidden": args.hidden,
        "train_steps": args.train_steps,
        "train_examples": {k: int(v) for k, v in collections.Counter(tr["family"].tolist()).items()},
        "augmentations": list(AUGMENTATIONS if vae is not None else AUGMENTATIONS[:2]),
        "seeds": SEEDS,
        "teacher": {"n_per_kind": args.n_teacher, "steps": args.steps, "guidance": args.guidance, "fit_seed": 1000},
        "argv": sys.argv[1:] if argv is None else list(argv),
        "seconds": round(time.time() - t0, 1),
        "report": report,
    }
    judged.save_judge(out, meta)
    bar.update()
    bar.close()
    after = {name: P.file_sha256(Path(args.probe) / name) for name in (P.CONFIG, P.PARAMS)}
    assert before == after, "the probe's own files changed"
    print(json.dumps({"temperatures": temps, **report}, indent=1))
    print(f"wrote {out / P.VALIDITY} and {out / P.CALIBRATION} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
