"""Inception-v4 and Inception-ResNet-v2 against timm: layout, full-size counts, outputs on drawn weights, conversion."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from parity import assert_parity, golden_tool

import jaxdiff
from jaxdiff.convert import checkpoint, layout, timm_inception
from jaxdiff.convert.safetensors_io import write_safetensors
from jaxdiff.convert.table import CheckpointMismatchError
from jaxdiff.errors import UserError
from jaxdiff.models.inception_v4 import NUM_FEATURES

HERE = os.path.dirname(os.path.abspath(__file__))
NETWORKS = ("inception_v4", "inception_resnet_v2")
# timm 1.0's `sum(p.numel() for p in model.parameters())` for the full-size 1000-class networks, and the BatchNorm
# running means and variances (buffers in torch) that jaxdiff keeps among its params.
TIMM_PARAMS = {"inception_v4": 42_679_816, "inception_resnet_v2": 55_843_464}
RUNNING_STATS = {"inception_v4": 63_168, "inception_resnet_v2": 60_544}
REL = 1e-4  # |ours - timm| <= 1e-4 * max(1, max|timm|) for features and logits


def _tool():
    return golden_tool()


@pytest.fixture(scope="module")
def tool():
    return _tool()


@pytest.fixture(scope="module", params=NETWORKS)
def golden(request):
    with np.load(os.path.join(HERE, "goldens", f"timm_{request.param}.npz")) as f:
        return {"name": request.param, **{k: f[k] for k in f.files}}


@pytest.fixture(scope="module")
def timm_state(golden, tool):
    """The reference weights drawn again from the stored seed, keyed and shaped as timm's state dict."""
    shapes = {k: tuple(v) for k, v in json.loads(str(golden["state_shapes"])).items()}
    state = tool.timm_inception_weights(shapes, int(golden["weights_seed"]))
    assert tool.weights_checksum(state) == pytest.approx(float(golden["weights_checksum"]), rel=1e-12), (
        "numpy drew different weights from the seed than in the golden venv (numpy stream changed?)"
    )
    return state


@pytest.fixture(scope="module")
def model(timm_state, golden):
    return timm_inception.from_state_dict(timm_state, where=f"drawn {golden['name']} weights")


def _torch_shapes(abstract) -> dict[str, list[int]]:
    flat = {tuple(p.key for p in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(abstract.params)[0]}
    shapes = {}
    for e in layout.conversion_table(abstract):
        shape = list(flat[e.flax_path].shape)
        if e.transform == "conv":  # torch stores conv weights OIHW and Linear weights [out, in]
            kh, kw, i, o = shape
            shape = [o, i, kh, kw]
        elif e.transform == "linear":
            shape = shape[::-1]
        shapes[e.torch_key] = shape
    return shapes


def test_layout_has_timm_keys_and_shapes_and_full_size_parameter_count(golden):
    name = golden["name"]
    abstract = jaxdiff.init_model(timm_inception.config(name))  # jax.eval_shape: nothing allocated
    assert isinstance(jax.tree_util.tree_leaves(abstract.params)[0], jax.ShapeDtypeStruct)
    timm_shapes = json.loads(str(golden["state_shapes"]))
    assert _torch_shapes(abstract) == {k: v for k, v in timm_shapes.items() if not k.endswith("num_batches_tracked")}
    assert int(golden["torch_num_params"]) == TIMM_PARAMS[name]
    running = sum(int(np.prod(v)) for k, v in timm_shapes.items() if k.endswith(("running_mean", "running_var")))
    assert running == RUNNING_STATS[name]
    assert abstract.num_params() == TIMM_PARAMS[name] + RUNNING_STATS[name]


def test_features_and_logits_match_timm_on_drawn_weights(model, golden, tool):
    x = tool.timm_scale(golden["images"])  # [2, 107, 91, 3]: not square, the last stage 2x1
    out = jax.jit(model.apply)(model.params, x)
    assert set(out) == {"features", "logits"}
    assert_parity(out["features"], golden["features"], rel=REL, what=f"{golden['name']} features")
    assert_parity(out["logits"], golden["logits"], rel=REL, what=f"{golden['name']} logits")


def test_state_dict_round_trip_is_bitwise(model, timm_state):
    exported = timm_inception.to_state_dict(model)
    assert set(exported) == {k for k in timm_state if not k.endswith("num_batches_tracked")}
    for key, value in exported.items():  # the model came from timm_state: import then export gives every bit back
        assert value.dtype == np.float32 and value.shape == timm_state[key].shape, key
        np.testing.assert_array_equal(value, timm_state[key], err_msg=key)


ONE = pytest.mark.parametrize("golden", ["inception_resnet_v2"], indirect=True)  # the converter paths, on one network


@ONE
def test_converter_names_every_missing_unexpected_and_misshaped_key(golden, timm_state):
    name = golden["name"]
    head = timm_inception.NETWORKS[name][2]
    first = timm_inception.NETWORKS[name][1]
    bad = dict(timm_state)
    gone = sorted(k for k in bad if k.endswith("running_var"))[-1]
    del bad[gone]
    bad["aux_logits.fc.weight"] = np.zeros((10, 768), np.float32)
    bad[first] = np.zeros((32, 3, 5, 5), np.float32)
    with pytest.raises(CheckpointMismatchError) as err:
        timm_inception.from_state_dict(bad)
    message = str(err.value)
    assert f"missing keys (1): {gone}" in message
    assert "unexpected keys (1): aux_logits.fc.weight" in message
    assert f"{first} (checkpoint (32, 3, 5, 5), model expects (32, 3, 3, 3))" in message
    assert "num_batches_tracked" not in message  # timm's BatchNorm counters are ignored, not reported
    # the classifier's shape sets num_classes; a classifier weight and bias that disagree are a mismatch
    odd = {**timm_state, f"{head}.weight": np.zeros((7, 1536), np.float32)}
    with pytest.raises(CheckpointMismatchError, match=rf"{head}\.bias \(checkpoint \(1000,\), model expects \(7,\)\)"):
        timm_inception.from_state_dict(odd)
    with pytest.raises(UserError, match="not a timm Inception-v4 / Inception-ResNet-v2 state dict"):
        timm_inception.from_state_dict({k: v for k, v in timm_state.items() if k != first})


@ONE
def test_headless_state_dict_gives_features_only(golden, timm_state):
    head = timm_inception.NETWORKS[golden["name"]][2]
    headless = {k: v for k, v in timm_state.items() if not k.startswith(head + ".")}
    model = timm_inception.from_state_dict(headless)
    assert model.config["num_classes"] == 0
    full = TIMM_PARAMS[golden["name"]] + RUNNING_STATS[golden["name"]]
    assert model.num_params() == full - NUM_FEATURES * 1000 - 1000  # no classifier weight [1000, 1536] and bias


@pytest.mark.parametrize("golden", ["inception_v4"], indirect=True)
def test_jaxdiff_convert_reads_a_timm_hub_folder_and_exports_it_back(model, golden, tmp_path):
    state = timm_inception.to_state_dict(model)
    hub = tmp_path / "hub"  # a timm hub folder: config.json naming the network + model.safetensors
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps({"architecture": "inception_v4", "num_classes": 1000}))
    write_safetensors(hub / "model.safetensors", state, metadata={"format": "pt"})
    loaded = timm_inception.load(hub / "model.safetensors")
    assert loaded.architecture.name == "InceptionV4"
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded.params, model.params)
    summary = checkpoint.convert(hub, tmp_path / "converted")
    assert summary["components"]["."]["class"] == "InceptionV4"
    checkpoint.export(tmp_path / "converted", tmp_path / "exported")  # jaxdiff's params -> timm's names again
    exported = checkpoint.read_state_dict(tmp_path / "exported" / "model.safetensors")
    assert set(exported) == set(state)
    for key in state:
        np.testing.assert_array_equal(exported[key], state[key], err_msg=key)
    with pytest.raises(FileNotFoundError, match="jaxdiff downloads nothing"):
        timm_inception.load(tmp_path / "inception_v4.pth")
