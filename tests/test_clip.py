"""CLIP text encoder: parity with transformers' PyTorch CLIP, lossless conversion, exact parameter counts."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from parity import assert_parity
from safetensors.numpy import load_file, save_file

from jaxdiff.convert import layout
from jaxdiff.convert.table import CheckpointMismatchError
from jaxdiff.models.clip import ARCHITECTURES
from jaxdiff.models.model import create

EOS = 400  # not the largest id, so the first-EOS rule and the legacy argmax rule pick different positions
PAD = 1
TINY = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    max_position_embeddings=16,
    bos_token_id=0,
    pad_token_id=PAD,
)

# name -> (transformers class, config overrides, whether inputs are right-padded with an attention mask)
CASES = {
    "legacy_eos_quick_gelu": (
        "CLIPTextModel",
        dict(num_hidden_layers=2, hidden_act="quick_gelu", eos_token_id=2),
        False,
    ),
    "first_eos_gelu_projection": (
        "CLIPTextModelWithProjection",
        dict(num_hidden_layers=3, hidden_act="gelu", eos_token_id=EOS, projection_dim=24),
        True,
    ),
    "first_eos_tanh": (
        "CLIPTextModel",
        dict(num_hidden_layers=2, hidden_act="gelu_pytorch_tanh", eos_token_id=EOS),
        True,
    ),
}


def _inputs(eos_token_id):
    """Two rows of length 16: random tokens, an EOS mid-sequence, then padding (PAD in row 0, EOS in row 1)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 1000, size=(2, 16))
    ids[ids == EOS] = 5
    mask = np.ones((2, 16), np.int32)
    if eos_token_id == 2:
        # Legacy tokenizers: EOS is the largest id; pad with EOS so argmax must take the first one.
        ids = rng.integers(3, 999, size=(2, 16))
        ids[0, 6:] = 999
        ids[1, 15] = 999
        return ids.astype(np.int32), None
    ids[0, 7], ids[0, 8:], mask[0, 8:] = EOS, PAD, 0
    ids[1, 11], ids[1, 12:], mask[1, 12:] = EOS, EOS, 0
    assert (ids.argmax(-1) != np.array([7, 11])).any()  # the two pooling rules disagree on these inputs
    return ids.astype(np.int32), mask


def _randomized(model):
    """Every parameter random: the default init leaves biases at 0 and LayerNorm weights at 1, which would hide a
    dropped or swapped bias or norm parameter."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.2 if name.endswith("bias") or "norm" in name else 0.5 * float(p.std())
            p.add_(scale * torch.randn(p.shape, generator=g))
            assert float(p.std()) > 0.05 * max(scale, 1e-3), name  # no parameter is left constant
    return model


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    cls_name, overrides, padded = CASES[request.param]
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**TINY, **overrides)
    pt = _randomized(getattr(transformers, cls_name)(config).eval())
    folder = tmp_path_factory.mktemp(request.param)
    pt.save_pretrained(folder)
    state = load_file(os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json")) as f:
        config_dict = json.load(f)

    ids, mask = _inputs(config.eos_token_id)
    if not padded:
        mask = None
    pt_mask = None if mask is None else torch.from_numpy(mask).long()
    with torch.no_grad():
        text = pt.text_model if hasattr(pt, "text_model") else pt
        ref = text(torch.from_numpy(ids).long(), attention_mask=pt_mask, output_hidden_states=True)
        ref = {
            "last_hidden_state": ref.last_hidden_state.numpy(),
            "hidden_states": [h.numpy() for h in ref.hidden_states],
            "pooler_output": ref.pooler_output.numpy(),
        }
        if hasattr(pt, "text_projection"):
            ref["text_embeds"] = pt(torch.from_numpy(ids).long(), attention_mask=pt_mask).text_embeds.numpy()

    arch = ARCHITECTURES[cls_name]
    model = create(arch, config_dict, abstract=True)
    params = layout.load_state_dict(model, state)
    out = jax.jit(model.apply)(params, jnp.asarray(ids), None if mask is None else jnp.asarray(mask))
    return dict(
        name=cls_name,
        pt=pt,
        state=state,
        model=model,
        params=params,
        ids=ids,
        mask=mask,
        ref=ref,
        out=jax.device_get(out),
        num_layers=config.num_hidden_layers,
    )


def test_outputs_match_transformers(case):
    ref, out = case["ref"], case["out"]
    assert_parity(out["last_hidden_state"], ref["last_hidden_state"], what="last_hidden_state")
    assert_parity(out["hidden_states"][-2], ref["hidden_states"][-2], what="penultimate hidden state")
    assert len(out["hidden_states"]) == len(ref["hidden_states"]) == case["num_layers"] + 1
    for i, (a, b) in enumerate(zip(out["hidden_states"], ref["hidden_states"])):
        assert_parity(a, b, what=f"hidden_states[{i}]")
    assert_parity(out["pooler_output"], ref["pooler_output"], what="pooler_output")
    assert ("text_embeds" in out) == ("text_embeds" in ref)
    if "text_embeds" in ref:
        assert_parity(out["text_embeds"], ref["text_embeds"], what="text_embeds")


def test_param_tree_mirrors_pytorch_names(case):
    keys = {e.torch_key for e in layout.conversion_table(case["model"])}
    assert "text_model.embeddings.token_embedding.weight" in keys
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    assert "text_model.final_layer_norm.weight" in keys
    assert ("text_projection.weight" in keys) == (case["name"] == "CLIPTextModelWithProjection")
    axes = case["model"].logical_axes["text_model"]["encoder"]["layers_0"]
    assert tuple(axes["self_attn"]["q_proj"]["kernel"]) == ("embed", "heads")
    assert tuple(axes["self_attn"]["out_proj"]["kernel"]) == ("heads", "embed")
    assert tuple(axes["mlp"]["fc1"]["kernel"]) == ("embed", "mlp")
    assert tuple(axes["mlp"]["fc2"]["kernel"]) == ("mlp", "embed")


def test_state_dict_round_trip_is_bitwise(case):
    exported = layout.to_state_dict(case["model"], case["params"])
    # transformers 5 saves CLIPTextModel without the `text_model.` prefix; jaxdiff exports the Hub spelling.
    original = {
        k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
        for k, v in case["state"].items()
    }
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype and exported[key].shape == value.shape, key
        assert np.array_equal(exported[key], value), key


def test_export_loads_in_transformers(case, tmp_path):
    save_file(layout.to_state_dict(case["model"], case["params"]), os.path.join(tmp_path, "model.safetensors"))
    case["pt"].config.save_pretrained(tmp_path)
    reloaded = getattr(transformers, case["name"]).from_pretrained(tmp_path).eval()
    for name, tensor in case["pt"].state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_legacy_position_ids_buffer_is_ignored_and_missing_keys_are_reported(case):
    state = dict(case["state"])
    prefix = "text_model." if case["name"] == "CLIPTextModelWithProjection" else ""
    state[prefix + "embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    layout.load_state_dict(case["model"], state)
    del state[prefix + "final_layer_norm.weight"]
    with pytest.raises(CheckpointMismatchError, match="final_layer_norm.weight"):
        layout.load_state_dict(case["model"], state)


def test_bfloat16_compute_stays_close(case):
    arch = ARCHITECTURES[case["name"]]
    model = create(arch, case["model"].config, abstract=True, dtype=jnp.bfloat16)
    mask = None if case["mask"] is None else jnp.asarray(case["mask"])
    out = jax.jit(model.apply)(case["params"], jnp.asarray(case["ids"]), mask)
    assert out["last_hidden_state"].dtype == jnp.bfloat16
    for key in ("last_hidden_state", "pooler_output", "text_embeds"):
        if key in case["ref"]:
            assert_parity(out[key].astype(np.float32), case["ref"][key], rel=5e-2, what=key)


FULL_SIZE = {
    # SD 1.x: OpenAI CLIP ViT-L/14 text tower.
    "CLIPTextModel": (
        dict(
            vocab_size=49408,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        ),
        123_060_480,
    ),
    # SD 2.x: OpenCLIP ViT-H text tower without its last layer.
    "ViT-H-23": (
        dict(
            vocab_size=49408,
            hidden_size=1024,
            num_hidden_layers=23,
            num_attention_heads=16,
            intermediate_size=4096,
            max_position_embeddings=77,
            hidden_act="gelu",
        ),
        340_387_840,
    ),
    # SDXL text_encoder_2: OpenCLIP bigG with projection.
    "CLIPTextModelWithProjection": (
        dict(
            vocab_size=49408,
            hidden_size=1280,
            num_hidden_layers=32,
            num_attention_heads=20,
            intermediate_size=5120,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=1280,
        ),
        694_659_840,
    ),
}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_parameter_counts(name):
    config, expected = FULL_SIZE[name]
    arch = ARCHITECTURES["CLIPTextModelWithProjection" if "projection_dim" in config else "CLIPTextModel"]
    assert create(arch, config, abstract=True).num_params() == expected
