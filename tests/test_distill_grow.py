"""A deeper student (jaxdiff.distill.grow): the grown UNet computes its init's function, matches diffusers after
export, and `jaxdiff distill` trains, saves and continues it; methods that cannot take it refuse before writing."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from test_distill_sid import TINY_UNET, tiny_teacher  # noqa: F401  (a fixture: a tiny random UNet in the shapes pipeline)

from jaxdiff.config import load_config
from jaxdiff.distill import grow
from jaxdiff.distill import run as run_lib
from jaxdiff.errors import UserError

# Cross-attention in both resolutions and the mid block: three Transformer2DModels down, four up, one mid.
ATTN_UNET = {
    **TINY_UNET,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}


def _random_unet(config, seed=0):
    from jaxdiff.models import unet
    from jaxdiff.models.model import create

    model = create(unet.ARCHITECTURES["UNet2DConditionModel"], config, abstract=True, attention="einsum")
    rng = np.random.default_rng(seed)
    draw = lambda p, x: (
        1 + 0.1 * rng.standard_normal(x.shape) if p[-1].key == "scale" else 0.1 * rng.standard_normal(x.shape)
    )  # noqa: E731,E501
    params = jax.tree_util.tree_map_with_path(lambda p, x: draw(p, x).astype(np.float32), model.params)
    return dataclasses.replace(model, params=params)


def _inputs(seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([999.0, 400.0], np.float32)
    ctx = rng.standard_normal((2, 5, 128)).astype(np.float32)
    return x, t, ctx


def test_deepened_unet_computes_its_inits_function():
    small = _random_unet(ATTN_UNET)
    big = grow.deepen(small, 3, seed=2)
    assert grow.transformer_layers(big.config) == [3, 3]
    assert big.num_params() > small.num_params()
    x, t, ctx = _inputs()
    before = np.asarray(small.apply(small.params, x, t, ctx))
    np.testing.assert_allclose(np.asarray(big.apply(big.params, x, t, ctx)), before, atol=1e-5)  # float32
    # The added blocks are trainable, not dead: their other weights are random, only the output projections are 0.
    mid = big.params["mid_block"]["attentions_0"]["transformer_blocks_2"]
    assert not np.any(mid["ff"]["net_2"]["kernel"]) and np.any(mid["ff"]["net_0"]["proj"]["kernel"])
    assert np.any(mid["attn1"]["to_q"]["kernel"])
    # The test can fail: one added projection made non-zero changes the function.
    mid["attn2"]["to_out_0"]["bias"] = np.full_like(mid["attn2"]["to_out_0"]["bias"], 0.1)
    assert np.max(np.abs(np.asarray(big.apply(big.params, x, t, ctx)) - before)) > 1e-3
    assert grow.deepen(small, 1) is small


def test_deepen_refuses_fewer_blocks():
    with pytest.raises(UserError, match="fewer than the init's 2"):
        grow.deepen(_random_unet({**ATTN_UNET, "transformer_layers_per_block": 2}), 1)


def test_grown_unet_exports_to_a_diffusers_unet_with_the_same_outputs(tmp_path):
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel

    from jaxdiff.convert import checkpoint

    big = grow.deepen(_random_unet(ATTN_UNET), 2, seed=3)
    # Make the added blocks matter before the comparison (zero branches would hide a mis-exported block).
    big = dataclasses.replace(
        big,
        params=jax.tree_util.tree_map(
            lambda p: p + 0.05 * np.random.default_rng(4).standard_normal(p.shape).astype(np.float32), big.params
        ),
    )
    checkpoint.export(big, tmp_path / "unet")
    ref = UNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert ref.config.transformer_layers_per_block == 2
    x, t, ctx = _inputs()
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    got = np.asarray(big.apply(big.params, x, t, ctx))
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-4)  # float32, two frameworks


def test_instaflow_deep_trains_saves_and_continues_a_larger_student(tiny_teacher, tmp_path):  # noqa: F811
    from jaxdiff.sampling.pipeline import load_pipeline

    config = load_config("configs/distill/instaflow.py:runlocal,deep")
    config.teacher = str(tiny_teacher)
    report = run_lib.distill(config, tmp_path / "deep", progress=False)
    teacher = load_pipeline(tiny_teacher).unet
    assert report["student"]["transformer_layers_per_block"] == [2, 2]
    assert report["student"]["unet_params"] > report["student"]["teacher_unet_params"] == teacher.num_params()
    assert "a deeper UNet" in (tmp_path / "deep" / "report.md").read_text()
    student = load_pipeline(tmp_path / "deep" / "model")
    assert (
        json.loads((tmp_path / "deep" / "model" / "unet" / "config.json").read_text())["transformer_layers_per_block"]
        == 2
    )
    z = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)
    images = student(["a red circle"], steps=1, guidance=1.0, latents=z)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()

    # A grown student continues as InstaFlow's init (no refusal for the grown keys) ...
    more = load_config("configs/distill/instaflow.py:runlocal")
    more.teacher, more.init = str(tiny_teacher), str(tmp_path / "deep" / "model")
    assert run_lib.distill(more, tmp_path / "more", progress=False)["train"]["steps"] == 3
    # ... but not for a method whose student must be the teacher's architecture, and nothing is written.
    sid = load_config("configs/distill/sid.py:smoke")
    sid.teacher, sid.init = str(tiny_teacher), str(tmp_path / "deep" / "model")
    with pytest.raises(UserError, match="differs from the teacher's .*transformer_layers_per_block"):
        run_lib.distill(sid, tmp_path / "sid", progress=False)
    sid.init = "teacher"
    sid.student = {"transformer_layers": 2}
    with pytest.raises(UserError, match="student.transformer_layers applies to reflow and instaflow, not sid"):
        run_lib.distill(sid, tmp_path / "sid", progress=False)
    assert not (tmp_path / "sid").exists()
