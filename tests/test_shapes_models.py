"""The shapes world's models: probe module, the train_shapes smoke path, the shipped pipeline and probe."""

from __future__ import annotations

import importlib.util
import json
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

    train = _tool("train_shapes")
    words = train.vocabulary_words()
    assert {"circle", "disc", "figure", "backdrop", "yellow", "crimson", "sided"} <= set(words)
    tok = build_clip_tokenizer(words, tmp_path / "tok", train.MAX_TOKENS)
    assert [w for w in words if len(tok.tokenize(w)) != 1] == []
    rng = np.random.default_rng(0)
    longest = max(len(tok(S.caption(S.sample_scene(rng, 2), rng, "heldout")).input_ids) for _ in range(300))
    assert longest <= train.MAX_TOKENS


def test_train_shapes_smoke_stages_resume_and_skip(tmp_path, capsys, monkeypatch):
    train = _tool("train_shapes")
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0 and "--stage" in capsys.readouterr().out
    w = tmp_path / "w"
    clip = [
        "--smoke",
        "--tiny",
        "--generate-data",
        "--num-examples",
        "64",
        "--workdir",
        str(w),
        "--stage",
        "clip",
        "--clip-steps",
        "4",
        "--save-every",
        "2",
    ]

    # A run killed after its first saved state (step 2)...
    save_state = train.save_state

    def dies_after_saving(path, state):
        save_state(path, state)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(train, "save_state", dies_after_saving)
    with pytest.raises(KeyboardInterrupt):
        train.main(clip)
    monkeypatch.setattr(train, "save_state", save_state)
    assert not (w / "clip" / "done.json").exists()
    # ...restarts from it and finishes,
    capsys.readouterr()
    assert train.main(clip) == 0
    assert "resuming from step 2" in capsys.readouterr().out
    done = json.loads((w / "clip" / "done.json").read_text())
    assert done["steps"] == 4 and (w / "clip" / "text_encoder" / "params.safetensors").is_file()
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

    vae = [*clip[:7], "--stage", "vae", "--vae-steps", "2"]
    assert train.main(vae) == 0
    vae_cfg = json.loads((w / "vae" / "vae" / "config.json").read_text())
    assert vae_cfg["_class_name"] == "AutoencoderKL" and vae_cfg["scaling_factor"] > 0
    latents = np.load(w / "vae" / "latents.npz")
    assert latents["mean"].shape == (64, 8, 8, 4)
    assert np.std(latents["mean"]) * vae_cfg["scaling_factor"] == pytest.approx(1.0, rel=1e-3)


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
