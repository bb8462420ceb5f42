"""`jaxdiff distill` end to end on a tiny config: pairs, the runner, a kill and its resume, a loadable student."""

import json

import numpy as np
import pytest
from test_distill_sid import tiny_teacher  # noqa: F401  (a fixture: a tiny random UNet in the shapes pipeline)

from jaxdiff import cli
from jaxdiff.config import load_config
from jaxdiff.distill import run as run_lib
from jaxdiff.train import runner


class Killed(Exception):
    pass


def test_distill_help(capsys):
    assert cli.main(["distill", "--help"]) == 0
    assert "configs/distill" in capsys.readouterr().out


def test_distill_runs_resumes_and_writes_a_loadable_student(tiny_teacher, tmp_path, monkeypatch):  # noqa: F811
    config = load_config("configs/distill/reflow.py:runlocal")
    config.teacher = str(tiny_teacher)  # a small UNet: the same code paths, a fraction of the compile time
    out = tmp_path / "run"

    def fault(moment, step):  # "kill" the first run right after step 3 ran (checkpoint of step 2 committed)
        if moment == "step" and step == 3:
            raise Killed

    monkeypatch.setattr(runner, "_fault", fault)
    with pytest.raises(Killed):
        run_lib.distill(config, out, progress=False)
    assert (out / "train" / "checkpoints").is_dir() and not (out / "model").exists()
    monkeypatch.setattr(runner, "_fault", lambda moment, step: None)
    report = run_lib.distill(config, out, progress=False)
    assert report["train"]["resumed_from"] == 2 and report["train"]["steps"] == 3
    assert report["pairs"]["written_shards"] == 0  # the pair store was complete
    assert [r["sampler"] for r in report["rows"]] == ["teacher DDIM 1", "reflow Euler 1"]
    saved = json.loads((out / "report.json").read_text())
    assert saved["rows"][1]["n"] == config.eval.num_images
    assert (out / "before_after.png").is_file() and (out / "report.md").is_file()

    from jaxdiff.sampling.pipeline import load_pipeline

    pipe = load_pipeline(out / "model")
    assert pipe.default_scheduler() == "flow_euler"
    images = pipe(["a red circle"], steps=1, guidance=1.0, seed=0)
    assert images.shape[0] == 1 and np.isfinite(images).all()
    # The pipeline's one-step flow Euler is the student's own one-step sampler.
    from jaxdiff.distill import rectified_flow as rf

    z = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    mine = rf.sample(pipe, pipe.unet.params, ["a red circle"], z, 1)
    np.testing.assert_allclose(pipe(["a red circle"], steps=1, guidance=1.0, latents=z), mine, atol=1e-5)

    changed = load_config("configs/distill/reflow.py:runlocal")
    changed.teacher = str(tiny_teacher)
    changed.train.steps = 4
    with pytest.raises(FileExistsError):
        run_lib.distill(changed, out, progress=False)


def test_instaflow_distills_the_2_rectified_flows_own_ode(tiny_teacher, tmp_path):  # noqa: F811
    """pairs.source="init": InstaFlow's pairs are the init model's (a 2-RF's) uniform-Euler solutions, a
    store keyed by that model, checked against two hand-written Euler steps of its velocity; a solver that cannot
    integrate the chosen model is refused before anything is written."""
    from jaxdiff.errors import UserError
    from jaxdiff.sampling.pipeline import load_pipeline

    # A stand-in 2-RF: a flow-velocity pipeline as a reflow run writes it (its UNet untrained; the pair math is
    # what is checked).
    run_lib.save_student(load_pipeline(tiny_teacher), load_pipeline(tiny_teacher).unet.params, tmp_path / "reflow", 1)
    two_rf = tmp_path / "reflow" / "model"

    config = load_config("configs/distill/instaflow.py:runlocal")
    config.teacher, config.init = str(tiny_teacher), str(two_rf)
    config.pairs.update(source="init", scheduler="ddim", guidance=1.0)
    with pytest.raises(UserError, match="flow-velocity model: use pairs.scheduler=rf_euler"):
        run_lib.distill(config, tmp_path / "wrong", progress=False)
    assert not (tmp_path / "wrong").exists()

    config.pairs.scheduler = "rf_euler"  # 2 uniform steps, σ 1 → 0.5 → 0
    report = run_lib.distill(config, tmp_path / "insta", progress=False)
    assert report["pairs"]["model"] == str(two_rf)
    store = np.load(sorted((tmp_path / "insta" / "pairs").glob("*.npz"))[0])
    pipe = load_pipeline(two_rf)
    ctx = pipe.encode_prompts(run_lib._prompts(config))[0]
    z = store["z0"]
    for sigma, nxt in ((1.0, 0.5), (0.5, 0.0)):  # diffusers' flow Euler: x ← x + (σ' − σ)·out(x, 1000 σ)
        t = np.full((len(z),), 1000.0 * sigma, np.float32)
        out = np.asarray(pipe.unet.apply(pipe.unet.params, z, t, ctx[store["prompt_index"]]), np.float32)
        z = z + (nxt - sigma) * out
    np.testing.assert_allclose(store["z1"], z, atol=1e-4)  # float32 UNet, two steps
