"""The shapes world's models: probe module, the train_shapes smoke path, the shipped pipeline and probe."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.data import shapes as S
from jaxdiff.metrics import probe as probe_lib

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "jaxdiff" / "assets"


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _test_renders(n):
    from jaxdiff.data.shapes_tfds import make_example

    items = [make_example("test", i, 32) for i in range(n)]
    labels = {
        k: np.stack([np.asarray(it[k]) for it in items]) for k in ("shape", "colour", "size", "position", "num_objects")
    }
    return np.stack([it["image"] for it in items]), labels


def test_probe_shapes_targets_and_roundtrip(tmp_path):
    probe = probe_lib.init_probe({"channels": [8, 16], "features": 24})
    images = np.zeros((3, 32, 32, 3), np.float32)
    logits, feats = probe.module.apply({"params": probe.params}, jnp.asarray(images))
    assert feats.shape == (3, 24)
    assert {k: v.shape for k, v in logits.items()} == {k: (3, len(v[2])) for k, v in probe_lib.HEADS.items()}
    preds, feats2 = probe((images * 255).astype(np.uint8))
    assert set(preds) == set(probe_lib.HEADS) and feats2.shape == (3, 24)

    single = S.scene_labels(S.Scene((S.ShapeObject("square", "blue", "large", "left"),), "white"))
    pair = S.scene_labels(
        S.Scene(
            (S.ShapeObject("circle", "red", "small", "left"), S.ShapeObject("triangle", "yellow", "large", "right")),
            "grey",
        )
    )
    batch = {k: np.stack([single[k], pair[k]]) for k in single}
    t = probe_lib.targets(batch)
    assert t["num_objects"].tolist() == [0, 1]
    assert t["shape0"].tolist() == [1, 0] and t["shape1"].tolist() == [-1, 2]  # no right slot for one object
    assert t["position0"].tolist() == [1, -1]  # position judged for single objects only
    perfect = {k: np.maximum(v, 0) for k, v in t.items()}
    assert probe_lib.accuracy(perfect, t)["all"] == 1.0
    wrong = dict(perfect, colour1=np.array([0, 0]))  # slot 1 of the single object is ignored, of the pair not
    acc = probe_lib.accuracy(wrong, t)
    assert acc["colour1"] == 0.0 and acc["all"] == 0.5
    loss, _ = probe_lib.loss_fn(logits | {}, {k: jnp.asarray(np.concatenate([v, v[:1]])) for k, v in t.items()})
    assert np.isfinite(float(loss))

    probe.save(tmp_path / "p")
    again = probe_lib.load_probe(tmp_path / "p")
    np.testing.assert_array_equal(probe(images)[1], again(images)[1])
    with pytest.raises(FileNotFoundError):
        probe_lib.load_probe(tmp_path / "missing")


def test_every_vocabulary_word_is_one_token_and_heldout_prompts_fit(tmp_path):
    from jaxdiff.data.tokenizer import build_clip_tokenizer
    from jaxdiff.train.shapes.common import vocabulary_words
    from jaxdiff.train.shapes.models import MAX_TOKENS

    words = vocabulary_words()
    assert {"circle", "disc", "figure", "backdrop", "yellow", "crimson", "sided"} <= set(words)
    tok = build_clip_tokenizer(words, tmp_path / "tok", MAX_TOKENS)
    assert [w for w in words if len(tok.tokenize(w)) != 1] == []
    rng = np.random.default_rng(0)
    longest = max(len(tok(S.caption(S.sample_scene(rng, 2), rng, "heldout")).input_ids) for _ in range(300))
    assert longest <= MAX_TOKENS


def _smoke_flags(workdir, stage, steps):
    return [
        "--smoke",
        "--tiny",
        "--generate-data",
        "--num-examples",
        "64",
        "--workdir",
        str(workdir),
        "--stage",
        stage,
        f"--{stage}-steps",
        str(steps),
        "--save-every",
        "2",
    ]


def test_train_shapes_smoke_stages_resume_and_skip(tmp_path, capsys, monkeypatch):
    from jaxdiff.errors import EXIT_PREEMPTED

    train = _tool("train_shapes")
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0 and "--stage" in capsys.readouterr().out
    w = tmp_path / "w"
    clip = _smoke_flags(w, "clip", 4)

    # A run stopped by SIGTERM during step 3 (the runner's fault hook sends it) saves step 3 and exits 75...
    monkeypatch.setenv("JAXDIFF_FAULT", "step@3:term")
    assert train.main(clip) == EXIT_PREEMPTED
    monkeypatch.delenv("JAXDIFF_FAULT")
    assert not (w / "clip" / "done.json").exists()
    assert sorted(int(d.name) for d in (w / "clip" / "train" / "checkpoints").iterdir() if d.name.isdigit()) == [2, 3]
    # ...restarts from that checkpoint and finishes,
    capsys.readouterr()
    assert train.main(clip) == 0
    assert "step 3: compiled the clip step" in capsys.readouterr().out
    done = json.loads((w / "clip" / "done.json").read_text())
    assert done["steps"] == 4 and done["resumed_from"] == 3
    assert (w / "clip" / "text_encoder" / "params.safetensors").is_file()
    steps = [
        r["step"]
        for r in map(json.loads, (w / "log.jsonl").read_text().splitlines())
        if r.get("stage") == "clip" and "step" in r
    ]
    assert steps[-1] == 4
    assert (w / "clip" / "tokenizer" / "tokenizer_config.json").is_file()
    # and a finished stage is skipped.
    assert train.main(clip) == 0
    assert "already done" in capsys.readouterr().out
    # Other settings for a started stage are refused (exit 2), not silently mixed into its checkpoints.
    (w / "clip" / "done.json").unlink()
    assert train.main(_smoke_flags(w, "clip", 5)) == 2
    assert "changed: " in capsys.readouterr().err

    assert train.main(_smoke_flags(w, "vae", 2)) == 0
    vae_cfg = json.loads((w / "vae" / "vae" / "config.json").read_text())
    assert vae_cfg["_class_name"] == "AutoencoderKL" and vae_cfg["scaling_factor"] > 0
    latents = np.load(w / "vae" / "latents.npz")
    assert latents["mean"].shape == (64, 8, 8, 4)
    assert np.std(latents["mean"]) * vae_cfg["scaling_factor"] == pytest.approx(1.0, rel=1e-3)


def test_train_shapes_stage_killed_mid_way_resumes_to_the_uninterrupted_result(tmp_path):
    """kill -9 of the command right after the probe stage's step-2 checkpoint; the rerun resumes from it and ends
    with the same probe, bit for bit, as a run never interrupted (batches are a function of the step)."""
    import jax

    train = _tool("train_shapes")
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = {
        **os.environ,
        "JAXDIFF_FAULT": "saved@2",
        "JAX_COMPILATION_CACHE_DIR": str(jax.config.jax_compilation_cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    }
    cmd = [sys.executable, str(ROOT / "tools" / "train_shapes.py"), *_smoke_flags(killed, "probe", 5)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (killed / "probe" / "done.json").exists()

    assert train.main(_smoke_flags(killed, "probe", 5)) == 0
    assert train.main(_smoke_flags(clean, "probe", 5)) == 0
    resumed = json.loads((killed / "probe" / "done.json").read_text())
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 5
    assert json.loads((clean / "probe" / "done.json").read_text())["resumed_from"] == 0
    a, b = (probe_lib.load_probe(w / "probe" / "probe").params for w in (killed, clean))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rows = [
        [json.loads(r) for r in (w / "probe" / "train" / "metrics.jsonl").read_text().splitlines()]
        for w in (killed, clean)
    ]
    assert [(r["step"], r["loss"]) for r in rows[0]] == [(r["step"], r["loss"]) for r in rows[1]]


@pytest.mark.skipif(not (ASSETS / "shapes" / "jaxdiff.json").is_file(), reason="shapes assets not trained yet")
def test_builtin_shapes_pipeline_generates_images():
    from jaxdiff.sampling.pipeline import load_pipeline

    pipe = load_pipeline("shapes")
    assert pipe.default_size == 32
    images = pipe(["a red circle", "a blue square on the left"], steps=3, guidance=5.0, seed=0)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.01
    index = json.loads((ASSETS / "shapes" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["safety_checker"] == [None, None]
    total = sum(
        f.stat().st_size
        for d in ("shapes", "shapes_clip", "shapes_probe")
        for f in (ASSETS / d).rglob("*")
        if f.is_file()
    )
    assert total <= 40 * 2**20


@pytest.mark.skipif(not (ASSETS / "shapes_probe" / "config.json").is_file(), reason="probe not trained yet")
def test_shipped_probe_reads_real_renders():
    images, labels = _test_renders(300)
    preds, _ = probe_lib.load_probe()(images)
    acc = probe_lib.accuracy(preds, probe_lib.targets(labels))
    assert min(acc[k] for k in ("num_objects", "shape0", "colour0", "shape1", "colour1", "position0")) >= 0.98, acc
