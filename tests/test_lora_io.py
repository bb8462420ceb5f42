"""LoRA files in kohya-ss and PEFT/diffusers layouts: exact round trips, kohya names as diffusers' own converter
reads them, α/r applied once, and files that do not fit named key by key."""

import re

import numpy as np
import pytest
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
from test_convert_io import tiny_pipeline

from jaxdiff import lora
from jaxdiff.convert import checkpoint, lora_io
from jaxdiff.errors import UserError

TEXT = r"self_attn/(q_proj|k_proj|v_proj|out_proj)/kernel$"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    models = checkpoint.load_components(tiny_pipeline(tmp_path_factory.mktemp("lora") / "pipe"))
    models = {k: models[k] for k in ("unet", "text_encoder")}
    rng = np.random.default_rng(0)
    adapters = {}
    for name, pattern in (("unet", lora.ATTENTION), ("text_encoder", TEXT)):
        fresh = lora.init(models[name].params, pattern, rank=4, init="kaiming")
        adapters[name] = {
            p: {"down": np.asarray(a["down"]), "up": rng.standard_normal(a["up"].shape).astype(np.float32)}
            for p, a in fresh.items()
        }
    alphas = {
        name: {p: float(i % 3 + 1) for i, p in enumerate(sorted(adapters[name]))} for name in adapters
    }  # different per module
    return models, adapters, alphas


def _same(a: dict, b: dict):
    assert set(a) == set(b)
    for component in a:
        assert set(a[component]) == set(b[component])
        for path in a[component]:
            for part in ("down", "up"):
                np.testing.assert_array_equal(a[component][path][part], b[component][path][part])


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_round_trips_are_exact(setup, fmt):
    models, adapters, alphas = setup
    components = {k: (models[k], adapters[k]) for k in models}
    if fmt == "kohya":
        state = lora_io.to_kohya(components, alphas)
        back, back_alphas = lora_io.from_kohya(state, models)
    else:
        state, metadata = lora_io.to_peft(components, alphas)
        back, back_alphas = lora_io.from_peft(state, models, metadata)
    _same(back, adapters)
    assert back_alphas == alphas


def test_kohya_names_and_alphas_read_by_diffusers_converter(setup):
    models, adapters, alphas = setup
    state = lora_io.to_kohya({k: (models[k], adapters[k]) for k in models}, alphas)
    converted, network_alphas = _convert_non_diffusers_lora_to_diffusers(dict(state))
    names = {k: lora_io.module_names(models[k]) for k in models}
    expected = set()
    for component, paths in adapters.items():
        for path in paths:
            expected.add(f"{component}.{names[component][path]}")

    def module_of(key):  # diffusers' older LoRA spelling (attn1.processor.to_q_lora.down.weight) -> the module
        key = re.sub(r"(_lora|\.lora|\.lora_linear_layer)?\.(down|up)\.weight$", "", key.replace(".processor.", "."))
        return key + ".0" if key.startswith("unet.") and key.endswith("to_out") else key

    got = {module_of(k) for k in converted}
    text_got = {k for k in got if k.startswith("text_encoder.")}
    unet_got = got - text_got
    assert unet_got == {e for e in expected if e.startswith("unet.")}
    # The text encoder's projections come back in diffusers' to_q/to_k/to_v/to_out spelling.
    spelled = {
        e.replace("q_proj", "to_q").replace("k_proj", "to_k").replace("v_proj", "to_v").replace("out_proj", "to_out")
        for e in expected
        if e.startswith("text_encoder.")
    }
    assert text_got == spelled
    assert sorted(network_alphas.values()) == sorted(a for c in alphas.values() for a in c.values())
    # The down weights are carried unchanged.
    for key, value in converted.items():
        if key.startswith("unet.") and ".down." in key:
            assert value.ndim == 2 and value.shape[0] == 4


def test_alpha_over_rank_is_applied_once(setup):
    models, adapters, alphas = setup
    state = lora_io.to_kohya({"unet": (models["unet"], adapters["unet"])}, alphas)
    path = sorted(adapters["unet"])[0]
    key = "lora_unet_" + lora_io.module_names(models["unet"])[path].replace(".", "_")
    # kohya: ΔW = up @ down · α / r in PyTorch's [out, in] layout.
    expected = state[f"{key}.lora_up.weight"] @ state[f"{key}.lora_down.weight"] * float(state[f"{key}.alpha"]) / 4
    back, back_alphas = lora_io.from_kohya(state, {"unet": models["unet"]})
    folded = lora_io.fold_alpha(back["unet"], back_alphas["unet"])
    merged = lora.merge(models["unet"].params, folded)
    flat_new, flat_old = lora.flatten(merged), lora.flatten(models["unet"].params)
    kernel = tuple(path.split("/")) + ("kernel",)
    np.testing.assert_allclose(np.asarray(flat_new[kernel] - flat_old[kernel]).T, expected, rtol=1e-5, atol=1e-6)


def test_files_that_do_not_fit_name_their_keys(setup):
    models, adapters, alphas = setup
    state = lora_io.to_kohya({"unet": (models["unet"], adapters["unet"])}, alphas)
    state["lora_unet_no_such_block_to_q.lora_down.weight"] = np.zeros((4, 8), np.float32)
    state["stray_key"] = np.zeros(1, np.float32)
    with pytest.raises(UserError, match="lora_unet_no_such_block_to_q.*stray_key"):
        lora_io.from_kohya(state, {"unet": models["unet"]})
    peft, metadata = lora_io.to_peft({"unet": (models["unet"], adapters["unet"])}, alphas)
    first_b = next(k for k in peft if k.endswith("lora_B.weight"))
    del peft[first_b]
    with pytest.raises(UserError, match="missing"):
        lora_io.from_peft(peft, {"unet": models["unet"]}, metadata)
