"""LPIPS (jaxdiff.metrics.lpips) against lpips 0.1.4 on drawn weights, its loading, and InstaFlow's distill_lpips loss.

The reference ran in its own venv (tools/make_metric_goldens.py --only lpips): lpips.LPIPS(net, version="0.1") with
weights drawn from a numpy seed (`lpips_weights`); tests/goldens/lpips.npz holds only the seed, the state-dict shapes,
a weights checksum and the distances, and the inputs and weights are drawn again here.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import golden_tool

from jaxdiff.errors import UserError
from jaxdiff.metrics import lpips as L

GOLDENS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "goldens", "lpips.npz")
REL = 1e-4  # |ours - reference| <= REL * |reference| per distance (reached: ~5e-7 vgg, ~2e-6 alex on CPU float32)


@pytest.fixture(scope="module")
def tool():
    return golden_tool()


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDENS)


@pytest.fixture(scope="module")
def weights(tool, golden):
    """{net: the drawn state dict}, checked against the golden venv's draw."""
    out = {}
    for net in L.NETS:
        out[net] = tool.lpips_weights(L.state_dict_shapes(net), int(golden["seed"]))
        assert tool.weights_checksum(out[net]) == pytest.approx(float(golden[f"{net}/weights_checksum"]), rel=1e-12), (
            "numpy drew different weights from the seed than in the golden venv (numpy stream changed?)"
        )
    return out


@pytest.fixture(scope="module")
def models(weights):
    return {net: L.load_lpips(w, net) for net, w in weights.items()}


@pytest.mark.parametrize("net", list(L.NETS))
def test_layout_is_the_lpips_packages(golden, net):
    theirs = {k: tuple(v) for k, v in json.loads(str(golden[f"{net}/state_shapes"])).items()}
    core = {k: v for k, v in theirs.items() if not k.startswith(("lins.", "scaling_layer."))}
    assert core == L.state_dict_shapes(net)
    assert {k for k in theirs if k.startswith("scaling_layer.")} == {"scaling_layer.shift", "scaling_layer.scale"}


@pytest.mark.parametrize("net", list(L.NETS))
def test_distances_match_the_lpips_package(tool, golden, models, net):
    for case, (in0, in1) in tool.lpips_inputs(int(golden["seed"])).items():
        ours = np.asarray(models[net](in0, in1), np.float64)
        ref = golden[f"{net}/{case}"].astype(np.float64)
        assert ours.shape == ref.shape and (ref > 0).all()
        np.testing.assert_allclose(ours, ref, rtol=REL, atol=0, err_msg=f"{net} {case}")
        np.testing.assert_allclose(ref, golden[f"{net}/{case}/layers"].sum(1), rtol=1e-5)  # the sum over taps


def test_identical_images_are_at_zero_and_normalize_maps_unit_range(models):
    rng = np.random.default_rng(0)
    a01, b01 = rng.uniform(0, 1, (2, 2, 32, 32, 3)).astype(np.float32)
    for model in models.values():
        same = np.asarray(model(a01 * 2 - 1, a01 * 2 - 1))  # 0 up to XLA's fused-reduction rounding (~1e-15)
        assert same.shape == (2,) and (np.abs(same) < 1e-12).all()
        np.testing.assert_allclose(model(a01, b01, normalize=True), model(2 * a01 - 1, 2 * b01 - 1), rtol=1e-6)
        with pytest.raises(UserError, match="at least"):
            model(a01[:, :15, :15], b01[:, :15, :15])
    alex = models["alex"]
    assert np.asarray(L.lpips_distance(alex.params, a01, a01, "alex")).tolist() == [0.0, 0.0]  # eagerly: exactly
    with pytest.raises(UserError, match="one shape"):
        models["vgg"](a01, b01[:1])


def test_gradients_are_finite_also_at_identical_images(models):
    model = models["vgg"]
    rng = np.random.default_rng(1)
    a, b = rng.uniform(-1, 1, (2, 1, 32, 32, 3)).astype(np.float32)
    a[:, :8] = -1.0  # a flat dark band: some taps are all-zero there (the unit norm's √0)

    def loss(x, y, params):
        return jnp.sum(L.lpips_distance(params, x, y, "vgg"))

    grad = jax.jit(jax.grad(loss, argnums=(0, 2)))
    g_img, g_params = grad(a, b, model.params)
    assert np.isfinite(g_img).all() and float(jnp.abs(g_img).max()) > 0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(g_params))
    g_same, _ = grad(a, a, model.params)
    assert np.isfinite(g_same).all() and float(jnp.abs(g_same).max()) < 1e-6


def _same_params(m1, m2):
    pairs = zip(jax.tree.leaves(m1.params), jax.tree.leaves(m2.params), strict=True)
    return all(np.array_equal(x, y) for x, y in pairs)


def test_loads_npz_safetensors_and_pth_as_the_package_saves_them(weights, models, tmp_path):
    from jaxdiff.convert.safetensors_io import write_safetensors

    full = dict(weights["alex"])  # as lpips.LPIPS().state_dict() gives it: with the buffers and the lins duplicates
    full["scaling_layer.shift"] = np.float32(L.SHIFT).reshape(1, 3, 1, 1)
    full["scaling_layer.scale"] = np.float32(L.SCALE).reshape(1, 3, 1, 1)
    full.update({f"lins.{k}.model.1.weight": weights["alex"][f"lin{k}.model.1.weight"] for k in range(5)})
    np.savez(tmp_path / "alex.npz", **full)
    write_safetensors(tmp_path / "alex.safetensors", full)
    for name in ("alex.npz", "alex.safetensors"):
        assert _same_params(L.load_lpips(tmp_path / name, "alex"), models["alex"]), name
    torch = pytest.importorskip("torch")
    torch.save({k: torch.from_numpy(v) for k, v in full.items()}, tmp_path / "alex.pth")
    assert _same_params(L.load_lpips(str(tmp_path / "alex.pth"), "alex"), models["alex"])
    with pytest.raises(FileNotFoundError, match="recipe"):
        L.load_lpips(tmp_path / "missing.pth")


@pytest.mark.parametrize("net", list(L.NETS))
def test_merge_state_dict_maps_torchvision_features_and_the_lin_file(weights, net):
    w = weights[net]
    lin = {k: v for k, v in w.items() if k.startswith("lin")}
    features = {k.split(".", 2)[2]: v for k, v in w.items() if k.startswith("net.")}  # net.slice1.0.weight: 0.weight
    for feats in (features, {f"features.{k}": v for k, v in features.items()}):
        merged = L.merge_state_dict(feats, lin, net)
        assert sorted(merged) == sorted(w) and all(merged[k] is w[k] for k in w)
    with pytest.raises(UserError, match="not a conv"):
        L.merge_state_dict({"1.weight": 0}, lin, net)


def test_wrong_keys_are_one_error_naming_them(weights):
    w = dict(weights["vgg"])
    del w["net.slice3.12.bias"]
    w["lin5.model.1.weight"] = np.zeros((1, 8, 1, 1), np.float32)
    w["lin0.model.1.weight"] = np.zeros((1, 32, 1, 1), np.float32)
    with pytest.raises(UserError) as e:
        L.load_lpips(w, "vgg")
    message = str(e.value)
    for part in ("missing net.slice3.12.bias", "unknown lin5.model.1.weight", "lin0.model.1.weight (1, 32, 1, 1)"):
        assert part in message
    with pytest.raises(UserError, match="its first conv is net='alex'"):
        L.load_lpips(weights["alex"], "vgg")
    with pytest.raises(UserError, match="must be one of"):
        L.load_lpips(weights["alex"], "squeeze")
    bad = dict(weights["alex"], **{"lins.0.model.1.weight": np.zeros((1, 64, 1, 1), np.float32)})
    with pytest.raises(UserError, match="differs"):
        L.load_lpips(bad, "alex")


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(weights, tmp_path):
    torch = pytest.importorskip("torch")
    from jaxdiff.convert.torch_io import UnsafeCheckpointError

    marker = tmp_path / "pwned"
    state = {k: torch.from_numpy(v) for k, v in weights["alex"].items()}
    torch.save({**state, "x": _Exploit(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="refused for safety"):
        L.load_lpips(tmp_path / "evil.pth", "alex")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ InstaFlow


def _tiny_vae_pipe():
    """A pipeline-shaped stand-in: a differentiable "VAE" latents [B, 8, 8, 4] -> images [B, 32, 32, 3] in [0, 1]."""
    import types

    mix = np.random.default_rng(5).standard_normal((4, 3)).astype(np.float32) * 0.5

    def decode(params, z):  # decode_unclipped maps [-1, 1] to [0, 1]
        return jnp.repeat(jnp.repeat(jnp.tanh(z @ params), 4, axis=1), 4, axis=2)

    return types.SimpleNamespace(vae=types.SimpleNamespace(config={"scaling_factor": 1.0}, params=mix, decode=decode))


def test_distill_lpips_is_zero_at_the_target_with_finite_gradients_and_mixes_l2(models):
    from jaxdiff.distill import rectified_flow as rf

    distance = rf.lpips_perceptual(_tiny_vae_pipe(), models["alex"])
    rng = np.random.default_rng(0)
    z0 = jnp.asarray(rng.standard_normal((2, 8, 8, 4)).astype(np.float32))
    batch = {"z0": z0, "z1": 0.5 * z0, "context": jnp.zeros((2, 1, 1), jnp.float32)}
    apply = lambda params, x, t, c: params * x  # noqa: E731  (x̂1 = (1 − w) z0: the target at w = 0.5)
    key = jax.random.PRNGKey(0)
    loss_fn = rf.make_loss(apply, "t0", 0.0, "distill_lpips", perceptual=distance)
    at_target, aux = jax.jit(loss_fn)({"unet": jnp.float32(0.5)}, {}, batch, key)
    assert abs(float(at_target)) < 1e-12 and float(aux["l2"]) == 0.0
    value, grad = jax.jit(jax.value_and_grad(lambda w: loss_fn({"unet": w}, {}, batch, key)[0]))(jnp.float32(0.8))
    assert float(value) > 1e-4 and np.isfinite(float(grad)) and float(grad) > 0
    mixed = rf.make_loss(apply, "t0", 0.0, "distill_lpips", perceptual=distance, perceptual_weight=2.0, l2_weight=0.5)
    v2, aux2 = jax.jit(mixed)({"unet": jnp.float32(0.8)}, {}, batch, key)
    np.testing.assert_allclose(aux2["perceptual"], value, rtol=1e-5)
    np.testing.assert_allclose(v2, 2 * value + 0.5 * aux2["l2"], rtol=1e-5)


def test_distill_lpips_from_the_instaflow_variant_needs_weights_and_uses_them(weights, tmp_path, monkeypatch):
    from jaxdiff.config import load_config
    from jaxdiff.distill import rectified_flow as rf
    from jaxdiff.sampling import pipeline

    teachers = []
    monkeypatch.setattr(pipeline, "load_pipeline", lambda name: teachers.append(name) or _tiny_vae_pipe())
    config = load_config("configs/distill/instaflow.py:runlocal,lpips")
    config.teacher = "the-teacher"
    with pytest.raises(UserError, match="perceptual_weights"):
        rf.perceptual_settings(config)
    with pytest.raises(UserError, match="LPIPS needs the VGG/AlexNet"):
        rf.make_loss(lambda p, x, t, c: x, "t0", 0.0, "distill_lpips")
    np.savez(tmp_path / "alex.npz", **weights["alex"])
    config.rectified_flow.update(perceptual_weights=str(tmp_path / "alex.npz"), lpips_net="alex", l2_weight=0.25)
    settings = rf.perceptual_settings(config)
    assert settings["perceptual_weight"] == 1.0 and settings["l2_weight"] == 0.25 and teachers == ["the-teacher"]
    z = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 8, 4)).astype(np.float32))
    d = jax.jit(settings["perceptual"])(z, 0.5 * z)
    assert d.shape == (2,) and np.isfinite(d).all() and (np.asarray(d) > 0).all()
