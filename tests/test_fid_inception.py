"""The FID Inception and its three preprocessing modes against pytorch-fid 0.3.0, clean-fid and torch-fidelity outputs.

The references ran in their own venv (tools/make_metric_goldens.py) on weights drawn from a numpy seed; the same
weights are drawn again here, converted from pytorch-fid's state-dict layout and compared on the stored inputs.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import assert_parity, golden_tool

import jaxdiff
from jaxdiff.convert import checkpoint, layout
from jaxdiff.convert.table import CheckpointMismatchError
from jaxdiff.errors import UserError
from jaxdiff.metrics import fid as fid_lib
from jaxdiff.metrics import frechet, resize
from jaxdiff.models.inception import FID_CONFIG
from jaxdiff.sharding import make_mesh

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDENS = os.path.join(HERE, "goldens", "fid_inception.npz")
PYTORCH_FID_STATS = os.path.join(HERE, "goldens", "fid_pytorch_fid_stats_dims64.npz")
MODES = ("pytorch-fid", "clean-fid", "torch-fidelity")


def _tool():
    return golden_tool()


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDENS) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def torch_state(golden):
    """The reference weights drawn again from the stored seed, in pytorch-fid's state-dict layout."""
    tool = _tool()
    shapes = {k: tuple(v) for k, v in json.loads(str(golden["state_shapes"])).items()}
    state = tool.inception_weights(shapes, int(golden["weights_seed"]))
    assert tool.weights_checksum(state) == pytest.approx(float(golden["weights_checksum"]), rel=1e-12), (
        "numpy drew different weights from the seed than in the golden venv (numpy stream changed?)"
    )
    return state


@pytest.fixture(scope="module")
def model(torch_state):
    abstract = jaxdiff.init_model(FID_CONFIG)
    params = layout.load_state_dict(abstract, torch_state, where="drawn weights")
    return dataclasses.replace(abstract, params=jax.tree.map(jnp.asarray, params))


@pytest.fixture(scope="module")
def network_outputs(model, golden):
    """jaxdiff's outputs for the stored images in each mode: one compiled network (inputs preprocessed apart)."""
    apply = jax.jit(model.apply)
    out = {}
    for mode in MODES:
        x = jax.jit(fid_lib.preprocess, static_argnums=1)(golden["images"], mode)
        out[mode] = {"preprocessed": np.asarray(x), **{k: np.asarray(v) for k, v in apply(model.params, x).items()}}
    return out


def test_layout_has_pytorch_fid_keys_and_shapes_and_full_size_parameter_count(golden):
    shape = jaxdiff.init_model(FID_CONFIG)  # abstract: nothing allocated
    shapes = json.loads(str(golden["state_shapes"]))
    table = layout.conversion_table(shape)
    flat = {tuple(p.key for p in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(shape.params)[0]}
    ours = {e.torch_key: list(flat[e.flax_path].shape) for e in table}
    for e in table:  # torch stores conv weights OIHW and Linear weights [out, in]
        if e.transform == "conv":
            kh, kw, i, o = ours[e.torch_key]
            ours[e.torch_key] = [o, i, kh, kw]
        elif e.transform == "linear":
            ours[e.torch_key] = ours[e.torch_key][::-1]
    assert ours == {k: v for k, v in shapes.items() if not k.endswith("num_batches_tracked")}
    running = sum(int(np.prod(v)) for k, v in shapes.items() if k.endswith(("running_mean", "running_var")))
    # torch's parameters() (trainable) + the BatchNorm running statistics jaxdiff keeps among its params
    assert int(golden["torch_num_params"]) == 23_834_568 + 16_392 == 23_850_960
    assert shape.num_params() == int(golden["torch_num_params"]) + running == 23_885_392


def test_converter_names_every_missing_unexpected_and_misshaped_key(torch_state):
    shape = jaxdiff.init_model(FID_CONFIG)
    bad = dict(torch_state)
    del bad["Mixed_7c.branch_pool.bn.running_var"]
    bad["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    bad["fc.weight"] = np.zeros((1000, 2048), np.float32)
    bad["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.zeros((), np.int64)  # a counter, not a weight: ignored
    with pytest.raises(CheckpointMismatchError) as err:
        layout.load_state_dict(shape, bad)
    message = str(err.value)
    assert "Mixed_7c.branch_pool.bn.running_var" in message and "AuxLogits.fc.weight" in message
    assert "fc.weight (checkpoint (1000, 2048), model expects (1008, 2048))" in message
    assert "num_batches_tracked" not in message


@pytest.mark.parametrize("mode", MODES)
def test_resize_matches_the_reference_when_shrinking_and_enlarging(golden, mode):
    small = golden["small_images"]
    for tag in ("down", "up"):
        ref = golden[f"resize/{tag}/{mode}"]
        x = small.astype(np.float32) / (255.0 if mode == "pytorch-fid" else 1.0)
        out = np.asarray(resize.resize(x, ref.shape[1:3], fid_lib.MODES[mode].resize))
        if mode == "clean-fid":
            out = np.clip(out, 0, 255)
        # float32 rounding only: 1e-6 of the value range ([0, 1] for pytorch-fid, [0, 255] otherwise)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6 * (1 if mode == "pytorch-fid" else 255), err_msg=tag)


@pytest.mark.parametrize("mode", MODES)
def test_network_input_matches_the_reference_preprocessing(golden, network_outputs, mode):
    ours = network_outputs[mode]["preprocessed"][:, :: _tool().SUBSAMPLE, :: _tool().SUBSAMPLE]
    assert ours.shape == golden[f"{mode}/preprocessed_sub"].shape
    np.testing.assert_allclose(ours, golden[f"{mode}/preprocessed_sub"], rtol=0, atol=2e-6)  # of the [-1, 1] range


@pytest.mark.parametrize("mode", MODES)
def test_pool3_and_logits_match_the_reference_in_each_mode(golden, network_outputs, mode):
    out = network_outputs[mode]
    names = ["block0", "pool3", "logits"] + (["block1", "block2"] if mode == "pytorch-fid" else [])
    for name in names:
        # |ours - ref| <= 1e-4 * max(1, max|ref|)
        assert_parity(out[name], golden[f"{mode}/{name}"], rel=1e-4, what=f"{mode} {name}")
    if mode == "torch-fidelity":  # its own extractor (not pytorch-fid's network) on the same weights and uint8 input
        assert_parity(out["logits_unbiased"], golden["torch-fidelity/own_logits_unbiased"], rel=1e-4)


@pytest.mark.parametrize("case", ["synthetic", "singular"])
def test_frechet_distance_matches_the_references_on_stored_features(golden, case):
    a, b = (
        (golden["frechet/a"], golden["frechet/b"])
        if case == "synthetic"
        else (golden["pytorch-fid/block0"], golden["clean-fid/block0"])
    )
    ours = fid_lib.fid(frechet.feature_statistics(a), frechet.feature_statistics(b))
    assert ours == pytest.approx(float(golden[f"frechet/{case}/pytorch-fid"]), abs=1e-3)
    assert ours == pytest.approx(float(golden[f"frechet/{case}/clean-fid"]), abs=1e-3)
    assert ours == pytest.approx(float(golden[f"frechet/{case}/torch-fidelity"]), abs=1e-3)


def test_statistics_files_are_interchangeable_with_pytorch_fid(model, golden, tmp_path):
    # pytorch-fid's own file (save_fid_stats --dims 64 on PNGs of the stored images) read by jaxdiff ...
    mu, sigma, n = fid_lib.statistics(golden["images"], "pytorch-fid", model, batch_size=3, dims=64)
    ref_mu, ref_sigma, ref_n = fid_lib.load_statistics(PYTORCH_FID_STATS)
    assert n == 4 and ref_n is None
    assert_parity(mu, ref_mu, rel=1e-4, what="mu")
    assert_parity(sigma, ref_sigma, rel=1e-4, what="sigma")
    assert fid_lib.fid(PYTORCH_FID_STATS, (mu, sigma)) == pytest.approx(0.0, abs=1e-3)
    # ... and jaxdiff's file read as pytorch-fid reads one (compute_statistics_of_path)
    path = str(tmp_path / "ours.npz")
    fid_lib.save_statistics(path, mu, sigma, n)
    with np.load(path) as f:
        m, s = f["mu"][:], f["sigma"][:]
    assert m.dtype == s.dtype == np.float64
    np.testing.assert_array_equal(m, mu)
    np.testing.assert_array_equal(s, sigma)


def test_streaming_moments_equal_numpy_mean_and_cov_for_any_batching():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((301, 17)) * 3.0 + 1e3  # a large mean: a naive sum of squares would lose digits
    for cuts in ([301], [1, 300], [50] * 6 + [1], [7, 0, 94, 200]):
        moments, start = fid_lib.Moments(17), 0
        for size in cuts:
            moments.add(x[start : start + size])
            start += size
        mu, sigma, n = moments.result()
        assert n == 301
        np.testing.assert_allclose(mu, x.mean(0), rtol=1e-14)
        np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_eight_devices_and_any_batching_give_the_statistics_of_one_device(model, golden, eight_devices):
    images = np.concatenate([golden["images"], golden["images"][:, ::-1], golden["images"][:2, :, ::-1]])  # 10
    one = fid_lib.statistics(images, "torch-fidelity", model, batch_size=4)
    mesh = make_mesh({"data": 8}, eight_devices)
    batches = (images[i : i + 3] for i in range(0, 10, 3))  # an iterable of uneven batches, re-batched to 8
    eight = fid_lib.statistics(batches, "torch-fidelity", model, mesh=mesh, batch_size=8)
    assert one[2] == eight[2] == 10
    # float32 features computed per device (batch 1 each) vs batches of 4 on one device: rounding only
    assert_parity(eight[0], one[0], rel=1e-5, what="mu")
    assert_parity(eight[1], one[1], rel=1e-5, what="sigma")


def test_pth_file_converts_through_torch_load_weights_only(torch_state, model, tmp_path):
    torch = pytest.importorskip("torch")
    pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({k: torch.from_numpy(v) for k, v in torch_state.items()}, pth)
    loaded = fid_lib.load_inception(pth)
    config = tmp_path / "inception.json"
    config.write_text(json.dumps(FID_CONFIG))
    checkpoint.convert(pth, tmp_path / "converted", config=config)
    again = jaxdiff.load_model(tmp_path / "converted")
    for tree in (loaded.params, again.params):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), tree, model.params)


def test_bad_input_is_one_clear_error(model, golden, tmp_path):
    images = golden["images"]
    with pytest.raises(UserError, match="mixed sizes"):
        fid_lib.statistics([images[0], images[1, :32]], "pytorch-fid", model)
    with pytest.raises(UserError, match="at least 2 images"):
        fid_lib.statistics(images[:1], "pytorch-fid", model, batch_size=3, dims=64)
    with pytest.raises(UserError, match="unknown FID preprocessing mode"):
        fid_lib.statistics(images, "tensorflow", model)
    with pytest.raises(UserError, match="needs the Inception weights"):
        fid_lib.statistics(images, "pytorch-fid")
    with pytest.raises(FileNotFoundError, match="jaxdiff downloads nothing"):
        fid_lib.load_inception(tmp_path / "pt_inception.pth")
    wrong = tmp_path / "wrong.npz"
    fid_lib.save_statistics(wrong, np.zeros(3), np.eye(3))
    with pytest.raises(UserError, match="different dimensions: 64 and 3"):
        fid_lib.fid(PYTORCH_FID_STATS, wrong)


def test_two_processes_give_the_statistics_of_one(tmp_path):
    """2 processes x 2 devices (jax.distributed over gloo), each passing half the images: features gathered across
    processes, float64 moments equal one process's within 1e-5 of their largest entry (block0 features, D = 64: float32
    features of other batch compositions differ by ~4e-8; a lost or doubled image moves them by ~1e-1)."""
    import subprocess
    import sys

    import fid_worker
    import train_worker as tw

    out = tmp_path / "stats.npz"
    env = tw.env(devices=2, CPU_DEVICES=2, PYTHON=sys.executable)
    env["XLA_FLAGS"] = tw.xla_flags_without_device_count()  # local.sh sets the device count per process
    worker = os.path.join(tw.ROOT, "tests", "fid_worker.py")
    result = subprocess.run(
        ["bash", os.path.join(tw.ROOT, "launch", "local.sh"), "2", "--exec", sys.executable, worker, str(out)],
        env=env,
        cwd=tw.ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    multi = np.load(out)
    mu, sigma, n = fid_lib.statistics(fid_worker.images(), "pytorch-fid", fid_worker.model(), batch_size=5, dims=64)
    assert int(multi["n"]) == n == 12
    np.testing.assert_allclose(multi["mu"], mu, rtol=0, atol=1e-5 * np.abs(mu).max())
    np.testing.assert_allclose(multi["sigma"], sigma, rtol=0, atol=1e-5 * np.abs(sigma).max())
