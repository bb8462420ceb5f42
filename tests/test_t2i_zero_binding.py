"""T2I-Zero's binding term: SupCon against a numpy transcription, weight 0 is bitwise the old objective, and its
gradient reaches only the placeholder rows (never Custom Diffusion's K/V)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxdiff.errors import UserError
from jaxdiff.personalize import binding, custom_diffusion, losses, textual_inversion, tokens


def supcon_numpy(z, labels, tau, valid):
    """Khosla et al. 2020 eq. 2 (L^sup_out), item by item."""
    z = np.asarray(z, np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    idx = [i for i in range(len(z)) if valid[i]]
    per = []
    for i in idx:
        if labels[i] < 0:
            continue
        others = [a for a in idx if a != i]
        pos = [p for p in others if labels[p] == labels[i]]
        if not pos:
            continue
        den = sum(np.exp(z[i] @ z[a] / tau) for a in others)
        per.append(-np.mean([np.log(np.exp(z[i] @ z[p] / tau) / den) for p in pos]))
    return float(np.mean(per)) if per else 0.0


@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_supcon_matches_the_numpy_transcription(tau):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((23, 16)).astype(np.float32)
    labels = rng.integers(-1, 3, 23)
    valid = rng.random(23) > 0.2
    got = binding.supcon(jnp.asarray(z), jnp.asarray(labels), tau, jnp.asarray(valid))
    np.testing.assert_allclose(float(got), supcon_numpy(z, labels, tau, valid), rtol=1e-5, atol=1e-5)
    everything = binding.supcon(jnp.asarray(z), jnp.asarray(labels), tau)
    np.testing.assert_allclose(float(everything), supcon_numpy(z, labels, tau, np.ones(23, bool)), rtol=1e-5)


def test_no_positive_pair_is_zero_with_finite_gradient():
    z = jnp.asarray(np.random.default_rng(1).standard_normal((4, 8)), jnp.float32)
    loss, grad = jax.value_and_grad(lambda x: binding.supcon(x, jnp.arange(4), 0.1))(z)
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0)


def test_context_items_label_placeholders_and_drop_bos_eos_padding():
    ids = jnp.asarray([[0, 7, 50, 1, 1], [0, 50, 9, 51, 1]])  # 0 BOS, 1 EOS/pad, 50/51 placeholders
    feats = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
    f, labels, valid = binding.context_items(feats, ids, [50, 51], eos_id=1)
    assert f.shape == (10, 3)
    np.testing.assert_array_equal(np.asarray(labels), [-1, -1, 0, -1, -1, -1, 0, -1, 1, -1])
    np.testing.assert_array_equal(np.asarray(valid), [0, 1, 1, 0, 0, 0, 1, 1, 1, 0])


class _Encoder:
    """A toy text encoder with the CLIP call signature: each position mixes with its predecessor (so a token's
    output depends on its context) through a frozen matrix."""

    def __init__(self, vocab, dim):
        rng = np.random.default_rng(0)
        table = jnp.asarray(rng.standard_normal((vocab, dim)), jnp.float32)
        self.params = {"text_model": {"embeddings": {"token_embedding": {"embedding": table}}}}
        self.params["mix"] = jnp.asarray(rng.standard_normal((dim, dim)) / np.sqrt(dim), jnp.float32)

    def apply(self, params, ids, token_embeds):
        prev = jnp.concatenate([jnp.zeros_like(token_embeds[:, :1]), token_embeds[:, :-1]], axis=1)
        return {"last_hidden_state": jnp.tanh(token_embeds + prev @ params["mix"])}


class _UNet:
    """A toy ε-predictor whose only weights are cross-attention K/V kernels (what Custom Diffusion trains)."""

    def __init__(self, dim, channels=4):
        rng = np.random.default_rng(1)
        w = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32)  # noqa: E731
        self.params = {"block": {"attn2": {"to_k": {"kernel": w(dim, channels)}, "to_v": {"kernel": w(dim, channels)}}}}

    def apply(self, params, x, t, ctx):
        a = params["block"]["attn2"]
        k, v = ctx @ a["to_k"]["kernel"], ctx @ a["to_v"]["kernel"]  # [B, L, C]
        return (
            x * jnp.mean(k, axis=1)[:, None, None, :]
            + jnp.mean(v, axis=1)[:, None, None, :]
            + 1e-3 * t[:, None, None, None]
        )


def _job(module, **binding_fields):
    """A Job stand-in with the shapes tokenizer (+ "<v>") and the toy models: plans build in milliseconds."""
    import importlib.util
    import types

    from jaxdiff.sampling import text
    from jaxdiff.sampling.pipeline import BUILTIN

    spec = importlib.util.spec_from_file_location("cfg", f"configs/personalize/{module}.py")
    cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cfg)
    c = cfg.get_config("runlocal")
    c.train.batch_size = 4
    if "prior" in c:
        c.prior.weight = 0.0  # no class images to generate
    c.binding.update(binding_fields)
    tokenizer, new_ids = tokens.add_tokens(text.load_tokenizer(BUILTIN["shapes"] / "tokenizer"), ["<v>"])
    te = _Encoder(new_ids[0], 8)
    prompts = [t.format("<v>") for t in ("a {}", "a red {}", "a picture of a {}", "an image of a {} on the left")]
    ids = text.tokenize(tokenizer, prompts)
    latents = np.random.default_rng(2).standard_normal((4, 4, 4, 4)).astype(np.float32)
    return types.SimpleNamespace(
        config=c,
        tokenizer=tokenizer,
        new_ids=new_ids,
        text_encoder=te,
        unet=_UNet(8),
        alphas_cumprod=lambda: np.linspace(0.999, 0.01, 50, dtype=np.float32),
        instance_batch=lambda step, batch: {"latents": latents[:batch], "ids": ids[:batch]},
    )


def _params(plan):
    return {"personal": plan.params}


def test_weight_zero_is_bitwise_the_textual_inversion_objective():
    job = _job("textual_inversion", weight=0.0)
    plan = textual_inversion.plan(job)
    batch = jax.tree_util.tree_map(jnp.asarray, plan.batch_fn(0))
    rng = jax.random.PRNGKey(3)
    got, aux = jax.jit(plan.loss)(_params(plan), plan.frozen, batch, rng)
    assert "binding" not in aux

    def reference(params, frozen, batch, rng):  # the objective before the binding option
        rows = params["personal"]["rows"]
        context = tokens.encode(job.text_encoder, frozen["text_encoder"], rows, batch["ids"])
        apply = lambda x, t, ctx: job.unet.apply(frozen["unet"], x, t, ctx)  # noqa: E731
        return jnp.mean(losses.eps_mse(apply, job.alphas_cumprod(), batch["latents"], context, rng, 0.0))

    want = jax.jit(reference)(_params(plan), plan.frozen, batch, rng)
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()

    on = textual_inversion.plan(_job("textual_inversion", weight=0.1))
    total, aux_on = jax.jit(on.loss)(_params(on), on.frozen, batch, rng)
    assert float(aux_on["binding"]) > 0
    np.testing.assert_allclose(float(total), float(got) + 0.1 * float(aux_on["binding"]), rtol=1e-6)


def test_binding_gradient_reaches_only_the_token_rows():
    """Custom Diffusion trains K/V and the row: the binding term's gradient is exactly zero on every K/V leaf,
    while the ε-MSE's is not."""
    plan = custom_diffusion.plan(_job("custom_diffusion", weight=0.1))
    batch = jax.tree_util.tree_map(jnp.asarray, plan.batch_fn(0))
    rng = jax.random.PRNGKey(0)
    grads = jax.jit(jax.grad(lambda p: plan.loss(p, plan.frozen, batch, rng)[1]["binding"]))(_params(plan))["personal"]
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(grads["attention"]))
    assert np.abs(np.asarray(grads["rows"])).max() > 0 and np.all(np.isfinite(np.asarray(grads["rows"])))
    full = jax.jit(jax.grad(lambda p: plan.loss(p, plan.frozen, batch, rng)[0]))(_params(plan))["personal"]
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree_util.tree_leaves(full["attention"]))


def test_bad_binding_options_are_user_errors():
    z, ids = jnp.zeros((1, 4, 8)), jnp.asarray([[0, 5, 1, 1]])
    for bad in (dict(features="words"), dict(temperature=0.0)):
        c = ml_collections.ConfigDict({**binding.config_block().to_dict(), **bad, "weight": 1.0})
        with pytest.raises(UserError):
            binding.term(c, rows=jnp.zeros((1, 8)), context=z, ids=ids, placeholder_ids=[5], eos_id=1)
