"""Closed-form erasure: the ridge kernel against numpy lstsq, K/V access, UCE, RECE, TRCE stage 1 and MACE."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import selectors
from jaxdiff.erase import common, mace, rece, ridge, trce, uce
from jaxdiff.erase.common import Encoded
from jaxdiff.models import clip, unet
from jaxdiff.models.model import create

D = 12  # cross-attention (text) width of the tiny models
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8,),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=D,
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("CrossAttnUpBlock2D",),
    attention_head_dim=2,
)
WORDS = "a photo of red blue circle square triangle painting by nobody the".split()


def _random_params(abstract_params, seed, scale=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(np.float32) * scale), abstract_params
    )


@pytest.fixture(scope="module")
def unet_params():
    model = create(unet.ARCHITECTURES["UNet2DConditionModel"], TINY_UNET, abstract=True, attention="einsum")
    return _random_params(model.params, 0)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """A tiny random CLIP text encoder with a word-level tokenizer: prompts -> Encoded."""
    from jaxdiff.data.tokenizer import build_clip_tokenizer
    from jaxdiff.sampling import text as text_lib

    tok = build_clip_tokenizer(WORDS, tmp_path_factory.mktemp("tok"), model_max_length=10)
    cfg = dict(
        vocab_size=len(tok),
        hidden_size=D,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=10,
        eos_token_id=tok.eos_token_id,
    )
    model = create(clip.ARCHITECTURES["CLIPTextModel"], cfg, abstract=True, attention="einsum")
    params = _random_params(model.params, 1, 0.5)
    apply = jax.jit(lambda ids: model.apply(params, ids)["last_hidden_state"])

    def encode(prompts):
        ids = text_lib.tokenize(tok, prompts)
        lengths = np.array([len(tok(p).input_ids) for p in prompts], np.int32)
        return Encoded(apply(jnp.asarray(ids)), ids, lengths, tuple(prompts))

    return encode


def _rand(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("lam,rho", [(0.3, 0.5), (0.0, 0.2)])
def test_ridge_kernel_matches_lstsq_on_the_augmented_problem(lam, rho):
    W, C, V, P = _rand((5, 7), 0), _rand((4, 7), 1), _rand((4, 5), 2), _rand((9, 7), 3)
    w = np.array([1.0, 0.5, 2.0, 0.1], np.float32)
    W_ref = _rand((5, 7), 4)
    S_cc, S_vc = P.T @ P, (W_ref @ P.T) @ P
    got = np.asarray(ridge.ridge_edit(W, C, V, w, lam, S_vc, S_cc, rho))
    A, B = ridge.augmented_lstsq_problem(W, C, V, w, lam, P, W_ref, rho)
    expected = np.linalg.lstsq(A, B, rcond=None)[0].T
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert got.dtype == np.float32


def test_edit_over_layers_equals_per_matrix_kernel():
    shapes = [(6, 7), (6, 7), (3, 7), (6, 7), (3, 7)]
    mats = {f"m{i}": jnp.asarray(_rand(s, 10 + i)) for i, s in enumerate(shapes)}
    C1, S1 = _rand((3, 7), 20), _rand((3, 7), 21)
    C2, S2 = _rand((2, 7), 22), _rand((2, 7), 23)
    C3 = _rand((2, 7), 24)
    src_mats = {n: w + 0.1 for n, w in mats.items()}
    explicit = {n: jnp.asarray(_rand((2, w.shape[0]), 30 + i)) for i, (n, w) in enumerate(mats.items())}
    P = _rand((8, 7), 40)
    terms = [
        ridge.Term(C1, np.array([1.0, 2.0, 0.5], np.float32), sources=S1),
        ridge.Term(C2, 0.3, sources=S2, value_mats=src_mats),
        ridge.Term(C3, 0.7, values=explicit),
    ]
    out, _ = ridge.edit(mats, terms, 0.4, ridge.Preserve(P.T @ P, 0.25))
    for n, W in mats.items():
        W = np.asarray(W)
        C = np.concatenate([C1, C2, C3])
        V = np.concatenate([S1 @ W.T, S2 @ np.asarray(src_mats[n]).T, np.asarray(explicit[n])])
        w = np.concatenate([[1.0, 2.0, 0.5], [0.3, 0.3], [0.7, 0.7]]).astype(np.float32)
        single = ridge.ridge_edit(W, C, V, w, 0.4, (W @ P.T) @ P, P.T @ P, 0.25)
        np.testing.assert_allclose(np.asarray(out[n]), np.asarray(single), rtol=2e-4, atol=2e-4)
    # anchor-valued terms only (the W' = W·X path) against the single-matrix kernel
    fast, _ = ridge.edit(
        mats, [ridge.Term(C1, 0.8, sources=S1), ridge.Term(C3, 0.2, sources=C3)], 0.3, ridge.Preserve(P.T @ P, 0.5)
    )
    for n, W in mats.items():
        W = np.asarray(W)
        C, V = np.concatenate([C1, C3]), np.concatenate([S1 @ W.T, C3 @ W.T])
        w = np.array([0.8] * 3 + [0.2] * 2, np.float32)
        single = ridge.ridge_edit(W, C, V, w, 0.3, (W @ P.T) @ P, P.T @ P, 0.5)
        np.testing.assert_allclose(np.asarray(fast[n]), np.asarray(single), rtol=2e-4, atol=2e-4)
    # the shared-factorisation path equals the vmapped per-matrix solve
    W = jnp.stack([mats["m0"], mats["m1"], mats["m3"]])
    VC = jnp.asarray(_rand((3, 6, 7), 50))
    CC = jnp.asarray(P.T @ P)
    np.testing.assert_allclose(
        np.asarray(ridge.ridge_solve_layers(W, VC, CC, 0.4)),
        np.asarray(ridge.ridge_solve_layers(W, VC, jnp.stack([CC] * 3), 0.4)),
        rtol=1e-4,
        atol=1e-5,
    )


def test_edit_reports_its_condition_number_and_refuses_an_ill_conditioned_one():
    """λ = 0 with a rank-deficient preservation matrix (2 cached rows in 7 dimensions) leaves directions no row
    constrains: refused with a UserError naming the settings; the same edit with λ > 0 reports a finite κ."""
    from jaxdiff.errors import UserError

    mats = {"m0": jnp.asarray(_rand((6, 7), 10))}
    C, S, P = _rand((1, 7), 20), _rand((1, 7), 21), _rand((2, 7), 40)
    terms = [ridge.Term(C, 1.0, sources=S)]
    with pytest.raises(UserError, match="ill-conditioned.*--config.uce.lam"):
        ridge.edit(mats, terms, 0.0, ridge.Preserve(P.T @ P, 1.0), settings=uce.SETTINGS)
    out, condition = ridge.edit(mats, terms, 0.5, ridge.Preserve(P.T @ P, 1.0))
    expected = np.linalg.cond(0.5 * np.eye(7) + C.astype(np.float64).T @ C + (P.T @ P).astype(np.float64))
    assert np.isfinite(condition) and condition == pytest.approx(expected, rel=1e-6)
    assert condition <= ridge.MAX_CONDITION and np.all(np.isfinite(np.asarray(out["m0"])))


def test_kv_access_uses_pytorch_convention_and_round_trips(unet_params):
    mats = ridge.get_kv(unet_params)
    # tiny UNet: transformers in down block 0, the mid block and up block 0 (2 layers) -> 4 attn2 -> 8 matrices
    assert len(mats) == 8 and all("attn2" in n for n in mats)
    assert sum(n.endswith("to_k") for n in mats) == 4
    name = "down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k"
    kernel = unet_params["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"]
    c = jnp.asarray(_rand((D,), 3))
    np.testing.assert_allclose(np.asarray(mats[name] @ c), np.asarray(c @ kernel), rtol=1e-5, atol=1e-6)
    assert mats[name].shape == (8, D)  # [d_out, d_in]
    back = ridge.set_kv(unet_params, mats)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(unet_params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert ridge.torch_name(name) == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(ValueError, match="transpose"):
        ridge.set_kv(unet_params, {name: mats[name].T})


# ---------------------------------------------------------------------------------------------- UCE


def test_token_modes(text):
    enc = text(["a photo of red circle", "blue square", ""])
    assert list(enc.lengths) == [7, 4, 2]
    assert common.pair_token_indices(enc, 0, enc, 1, "last_word") == ([5], [2])
    assert common.pair_token_indices(enc, 0, enc, 2, "last_word") == ([5], [0])  # "" -> BOS (official)
    assert common.pair_token_indices(enc, 0, enc, 1, "eot") == ([6], [3])
    old, new = common.pair_token_indices(enc, 0, enc, 1, "last_word_to_end")
    assert old == list(range(5, 10)) and new == list(range(2, 7))  # trimmed to equal length 10 - 5
    assert common.token_indices(enc, 1, "nonpad") == [0, 1, 2, 3]
    pair = text(["a photo of red circle", "a photo of blue square"])
    old, new = common.pair_token_indices(pair, 0, pair, 1, "residual")
    assert old[:4] == [0, 1, 2, 3] and new[:4] == [0, 1, 2, 3] and 4 not in old and 5 not in old
    assert len(old) == len(new)
    assert common.find_matching_indices([0, 5, 6, 9, 1], [0, 5, 7, 8, 9, 1]) == ([0, 1, 3, 4], [0, 1, 4, 5])


def test_uce_maps_target_tokens_to_the_guide_outputs(unet_params, text):
    edit, guide = text(["red circle"]), text(["blue square"])
    new, info = uce.uce(unet_params, edit, guide, lam=1e-4)
    assert info["matrices"] == 8
    old_m, new_m = ridge.get_kv(unet_params), ridge.get_kv(new)
    c, g = edit.emb[0, 2], guide.emb[0, 2]  # last word tokens
    for n in old_m:
        target = old_m[n] @ g
        assert float(jnp.linalg.norm(new_m[n] @ c - target)) <= 1e-3 * float(jnp.linalg.norm(target)) + 1e-4
    # the official default (λ = 0.5) moves every output most of the way
    new_d, _ = uce.uce(unet_params, edit, guide)
    for n, m in ridge.get_kv(new_d).items():
        before = jnp.linalg.norm(old_m[n] @ c - old_m[n] @ g)
        assert float(jnp.linalg.norm(m @ c - old_m[n] @ g)) < 0.5 * float(before)
    # only attn2 K/V changed
    flat_a, flat_b = selectors.flatten(unet_params), selectors.flatten(new)
    changed = {p for p in flat_a if not np.array_equal(np.asarray(flat_a[p]), np.asarray(flat_b[p]))}
    assert changed and all(p[-3] == "attn2" and p[-2] in ("to_k", "to_v") for p in changed)


def test_uce_options_values_only_and_tensor(unet_params, text):
    edit, guide = text(["red circle"]), text(["blue square"])
    only_v, info = uce.uce(unet_params, edit, guide, with_to_k=False)
    assert info["matrices"] == 4
    before, after = ridge.get_kv(unet_params), ridge.get_kv(only_v)
    assert all(np.array_equal(np.asarray(before[n]), np.asarray(after[n])) == n.endswith("to_k") for n in before)
    tensor, _ = uce.uce(unet_params, edit, guide, technique="tensor", lam=1e-4)
    c, g = edit.emb[0, 2], guide.emb[0, 2]
    for n, w in ridge.get_kv(tensor).items():  # W' c = W g − ⟨u, W g⟩ u with u = W c / ||W c||
        u = before[n] @ c / jnp.linalg.norm(before[n] @ c)
        want = before[n] @ g - jnp.dot(u, before[n] @ g) * u
        assert float(jnp.linalg.norm(w @ c - want)) <= 1e-3 * float(jnp.linalg.norm(want)) + 1e-4
    with pytest.raises(ValueError, match="technique"):
        uce.uce(unet_params, edit, guide, technique="nope")


def test_uce_preserve_term_preserves(unet_params, text):
    edit, guide = text(["red circle"]), text([""])
    keep = text(["red square", "blue circle", "painting of the triangle"])
    plain, _ = uce.uce(unet_params, edit, guide, preserve_tokens="nonpad")
    kept, _ = uce.uce(unet_params, edit, guide, keep, preserve_tokens="nonpad", preserve_scale=1.0)
    old = ridge.get_kv(unet_params)
    rows = uce.preserve_rows(keep, "nonpad")
    drift = lambda p: sum(float(jnp.linalg.norm(rows @ (m - old[n]).T)) for n, m in ridge.get_kv(p).items())  # noqa: E731
    assert drift(kept) < 0.7 * drift(plain)


def test_uce_tensor_values_follow_the_formula():
    W = jnp.asarray(_rand((5, 4), 0))
    C, S = jnp.asarray(_rand((3, 4), 1)), jnp.asarray(_rand((3, 4), 2))
    seg = np.array([0, 0, 1])
    got = np.asarray(uce.tensor_values({"w": W}, C, S, seg)["w"])
    for rows in (np.array([0, 1]), np.array([2])):
        out_old, N = np.asarray(C[rows] @ W.T), np.asarray(S[rows] @ W.T)
        U = out_old / np.linalg.norm(out_old)
        np.testing.assert_allclose(got[rows], N - np.sum(U * N) * U, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- RECE


def test_rece_embedding_satisfies_its_normal_equations(unet_params, text):
    concept = text(["red circle"])
    edited, _ = uce.uce(unet_params, concept, text([""]))
    W_edit, W_orig = ridge.get_kv(edited), ridge.get_kv(unet_params)
    reg = 0.1
    c = concept.emb[0]
    adv = rece.regenerating_embedding(W_edit, W_orig, c, reg)
    assert adv.shape == c.shape
    # ∇ [Σ ||W' c' − W c||² + λ||c'||²] = 2 (Σ W'ᵀ(W' c' − W c) + λ c') = 0 for every token row
    grad = reg * adv.T
    for n in W_edit:
        grad = grad + W_edit[n].T @ (W_edit[n] @ adv.T - W_orig[n] @ c.T)
    scale = sum(float(jnp.linalg.norm(W_edit[n].T @ W_orig[n] @ c.T)) for n in W_edit)
    assert float(jnp.linalg.norm(grad)) < 1e-4 * scale
    # and it regenerates: the edited layers reproduce the original K/V better from c' than from c
    err = lambda e: sum(float(jnp.linalg.norm(W_edit[n] @ e.T - W_orig[n] @ c.T)) for n in W_edit)  # noqa: E731
    assert err(adv) < err(c)


def test_rece_epochs_erase_the_regenerating_embedding_and_validation_picks_the_best(unet_params, text):
    concept, neutral = text(["red circle"]), text([" "])
    start, _ = uce.uce(unet_params, concept, text([""]))
    scores = iter([3.0, 1.0, 2.0])
    seen = []

    def validate(params, epoch):
        seen.append(epoch)
        return next(scores)

    best, info = rece.rece(
        start, unet_params, concept.emb, neutral.emb[0], neutral.emb, epochs=3, reg=1e-3, validate=validate
    )
    assert seen == [1, 2, 3] and info["best_epoch"] == 2
    assert [h["epoch"] for h in info["history"]] == [1, 2, 3]
    # epoch 1 maps its adversarial embedding towards the neutral target's outputs
    W0, Wu = ridge.get_kv(unet_params), ridge.get_kv(start)
    adv = rece.regenerating_embedding(Wu, W0, concept.emb[0], 1e-3)
    W1, _ = rece.rece_edit(Wu, adv[None], neutral.emb, neutral.emb)
    for n in W0:
        before = float(jnp.linalg.norm(Wu[n] @ adv.T - Wu[n] @ neutral.emb[0].T))
        assert float(jnp.linalg.norm(W1[n] @ adv.T - Wu[n] @ neutral.emb[0].T)) < before
    second, info2 = rece.rece(start, unet_params, concept.emb, neutral.emb[0], neutral.emb, epochs=2, reg=1e-3)
    assert info2["best_epoch"] == 2 and not np.array_equal(
        np.asarray(ridge.get_kv(second)[next(iter(W0))]), np.asarray(Wu[next(iter(W0))])
    )


@pytest.mark.parametrize("preserve", [[], ["a square", "a triangle"]])
def test_rece_retain_set_keeps_the_empty_prompt(monkeypatch, preserve):
    """As the official train_object.py (retain_texts = [''] + preserve_concepts), with or without preservation."""
    from types import SimpleNamespace

    from jaxdiff.erase.job import Result

    seen = {}
    monkeypatch.setattr(uce, "run", lambda job: Result("uce params", {}))
    monkeypatch.setattr(rece, "rece", lambda *args, **kw: (seen.setdefault("args", args)[0], {}))
    options = dict(validate=False, validate_initial=False, epochs=1, reg=1e-3, lam=0.1, erase_scale=1.0)
    options.update(preserve_scale=0.1, technique="replace")
    config = SimpleNamespace(rece=SimpleNamespace(**options), uce=SimpleNamespace(with_to_k=True))
    job = SimpleNamespace(config=config, concept_prompts=["a circle"], preserve_prompts=preserve, anchor="")
    job.__dict__.update(original="original params", is_shapes=False, context=list)  # context: the prompts themselves
    rece.run(job)
    assert seen["args"][4] == ["", *preserve]


def test_rece_picks_its_epoch_on_prompts_disjoint_from_the_test_prompts(monkeypatch):
    """The validation captions share no prompt with the evaluation sets and the attack prompts, and they are what
    the epoch's score is computed on (recorded in the report's info)."""
    from types import SimpleNamespace

    from jaxdiff.erase import evaluate as ev
    from jaxdiff.erase.job import Result

    sampled = []
    monkeypatch.setattr(uce, "run", lambda job: Result("uce params", {}))
    monkeypatch.setattr(rece, "rece", lambda *args, validate, **kw: (args[0], {"score": validate(args[0], 1)}))
    monkeypatch.setattr(rece, "probe", lambda: None)
    monkeypatch.setattr(ev, "attack_success", lambda probe, concept, images: 0.0)
    options = dict(validate=True, validate_initial=False, epochs=1, reg=1e-3, lam=0.1, erase_scale=1.0)
    options.update(preserve_scale=0.1, technique="replace", num_validation_prompts=16)
    eval_block = SimpleNamespace(num_images=64, seed=1234, attacks=True, attack_images=16)
    config = SimpleNamespace(rece=SimpleNamespace(**options), uce=SimpleNamespace(with_to_k=True), seed=0)
    config.eval = eval_block
    job = SimpleNamespace(config=config, concept_prompts=["a circle"], preserve_prompts=[], anchor="")
    job.__dict__.update(original="original params", is_shapes=True, concepts=["circle"], latent_shape=(2, 2, 1))
    job.context = list  # the prompts themselves
    job.images = lambda prompts, latents, params: sampled.append(list(prompts))
    info = rece.run(job).info
    concept = ev.resolve("circle")
    test = {p for prompts, _ in ev.prompt_sets(concept, 64, 1234).values() for p in prompts}
    test |= set(ev.attack_captions(concept, 16, 1234))
    chosen = info["validation"]["prompts"]
    assert len(chosen) == 16 and sampled == [chosen]
    assert not set(chosen) & test
    assert all("circle" in p for p in chosen)


# ---------------------------------------------------------------------------------------- TRCE / MACE


def test_trce_stage1_maps_only_the_first_eot(unet_params, text):
    old = text(["a photo of red circle", "red circle painting"])
    new = text(["a photo of blue square", "blue square painting"])
    cache = ridge.context_cache(text(["the painting", "a photo of nobody", "blue triangle by nobody"]).emb)
    ctx, src, w = trce.eot_mapping_terms(old, new)
    assert ctx.shape == (2, D) and np.allclose(np.asarray(w), 0.5)  # one [EoT] per pair, mean over pairs
    np.testing.assert_array_equal(np.asarray(ctx[0]), np.asarray(old.emb[0, 6]))
    words = trce.eot_mapping_terms(old, new, count_tokens="words")  # word-level vocabulary: the same tokens
    np.testing.assert_array_equal(np.asarray(words[0]), np.asarray(ctx))
    _, _, keyword, _ = trce.eot_positions(old, 0, new, 0)
    assert keyword == [4, 5]  # "red circle" differs from "blue square"
    edited, info = trce.eot_mapping(unet_params, old, new, cache, preserve_scale=0.1, cache_divisor=1.0)
    assert info["rho"] == pytest.approx(0.01)  # the official quirk squares preserve_scale
    W0, W1 = ridge.get_kv(unet_params), ridge.get_kv(edited)
    for n in W0:
        for i in range(2):
            c, v = old.emb[i, int(old.lengths[i]) - 1], W0[n] @ new.emb[i, int(new.lengths[i]) - 1]
            assert float(jnp.linalg.norm(W1[n] @ c - v)) < 0.05 * float(jnp.linalg.norm(W0[n] @ c - v))
    with pytest.raises(ValueError, match="singular"):
        trce.eot_mapping(unet_params, old, new)
    # A singular system (a zero cache: rank 2 in D dimensions) gives inf/nan or finite noise depending on the LAPACK
    # build, so the guard is proven on a system whose solve is certainly non-finite.
    with pytest.raises(FloatingPointError, match="ill-conditioned"):
        trce.eot_mapping(unet_params, old, new, jnp.nan * cache)


def test_mace_cfr_and_fusion(unet_params, text):
    old = text(["a photo of red circle", "red circle painting"])
    new = text(["a photo of blue square", "blue square painting"])
    cache = ridge.context_cache(text(["the painting", "a photo of nobody", "blue triangle by nobody"]).emb)
    ctx, src = mace.residual_rows(old, new)
    assert ctx.shape[0] == src.shape[0] == 2 * 8  # 10 positions minus the 2 differing tokens, per pair
    edited, info = mace.cfr(unet_params, old, new, cache, preserve_scale=1e-3, square_preserve_scale=False)
    assert info["rho"] == 1e-3
    W0, W1 = ridge.get_kv(unet_params), ridge.get_kv(edited)
    for n in W0:
        before = float(jnp.linalg.norm(ctx @ W0[n].T - src @ W0[n].T))
        assert float(jnp.linalg.norm(ctx @ W1[n].T - src @ W0[n].T)) < 0.5 * before  # 16 rows, 12 dims: no exact fit
    # fusion of one LoRA update: W' reproduces (W + ΔW) on the concept's tokens and W on the cache
    delta = {n: 0.1 * jnp.asarray(_rand(w.shape, 7)) for n, w in W0.items()}
    concept = old.emb[:1]
    fused, info = mace.fuse(unet_params, [delta], [concept], cache, rho=1e-2)  # 1e-4: κ ≈ 5e9, refused
    assert info["condition_number"] <= ridge.MAX_CONDITION
    rows = concept.reshape(-1, D)
    for n, w in ridge.get_kv(fused).items():
        want = rows @ (W0[n] + delta[n]).T
        assert float(jnp.linalg.norm(rows @ w.T - want)) < 0.1 * float(jnp.linalg.norm(rows @ W0[n].T - want))


# ------------------------------------------------------------------------------------------- configs


def _load_config(name, arg=""):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "configs" / "erase" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"erase_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert path.read_text().startswith("# COMMAND: jaxdiff erase --config configs/erase/")
    return module.get_config(arg)


def test_configs_name_real_parameters():
    import inspect

    from jaxdiff.erase import ablation, all_but_one, doco, esd, spm

    def params(*fns):
        return {p for f in fns for p in inspect.signature(f).parameters}

    # block -> (functions its keys are passed to, keys used by the command only)
    expected = {
        "esd": ("esd", params(esd.make_loss), {"erase_from"}),
        "uce": (
            "uce",
            params(uce.uce_mats, uce.uce),
            {"preserve_empty", "empty_guide_as_space", "expand_prompts", "concept_type"},
        ),
        "rece": ("rece", params(rece.rece), {"validate", "num_validation_prompts"}),
        "spm": ("spm", params(spm.make_loss), {"rank", "alpha", "ft_power", "matching_metric", "facilitate_factor"}),
        "trce": (
            "trce",
            params(trce.eot_mapping, trce.make_stage2_loss),
            {
                "augment_num",
                "stage2",
                "seeds_per_concept",
                "early_steps",
                "ddim_steps",
                "data_guidance",
                "uncond_trajectories",
                "uncond_guidance",
                "uncond_per_step",
                "epochs",
                "quirk_never_zero_grads",
            },
        ),
        "doco": (
            "doco",
            params(doco.DoCo.__init__),
            {"disc_lr", "disc_betas", "num_anchor_images", "scale_lr", "prior_concepts"},
        ),
        "all_but_one": ("all_but_one", params(all_but_one.make_loss), set()),
        "ablation": (
            "ablation",
            params(ablation.make_loss),
            {"with_prior", "num_anchor_images", "scale_lr", "caption_template"},
        ),
        "mace": ("mace", params(mace.cfr), {"cache_prompts"}),
    }
    for name, (block, accepted, extras) in expected.items():
        for arg in ("", "runlocal"):
            c = _load_config(name, arg)
            assert c.method == name and {"concept", "preserve", "anchor"} <= set(c.keys())
            unknown = set(c[block].keys()) - accepted - extras
            assert not unknown, f"{name}: config keys {unknown} match no parameter"
            if "train" in c:
                assert c.train.selector in selectors.SELECTORS
        with pytest.raises(ValueError, match="unknown"):
            _load_config(name, "nonsense")
    assert _load_config("esd", "runlocal").train.steps < _load_config("esd").train.steps


def test_uce_prompt_expansion():
    e, g = uce.expand_prompts(["circle"], [""], "object")
    assert e[:2] == ["circle", "image of circle"] and g[:2] == ["", "image of "] and len(e) == len(g) == 6
