"""Erasure fine-tuning objectives: ESD's target, partial sampling, SPM adapters and Facilitated
Transport, DoCo's gradient surgery and step, and finite losses/gradients of every objective on a tiny UNet."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff import lora as adapters
from jaxdiff import selectors
from jaxdiff.erase import ablation, common, doco, esd, spm, trce
from jaxdiff.erase.common import Encoded
from jaxdiff.models import unet
from jaxdiff.models.model import create

D, L, LATENT = 12, 6, (8, 8, 4)
# The smallest UNet with a cross-attention transformer (one, in the down block): compile time dominates here.
TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(8,),
    layers_per_block=1,
    norm_num_groups=4,
    cross_attention_dim=D,
    down_block_types=("CrossAttnDownBlock2D",),
    up_block_types=("UpBlock2D",),
    mid_block_type=None,
    attention_head_dim=2,
)
# Unoptimised XLA: halves the CPU compile time of these one-off programs.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def tiny():
    model = create(unet.ARCHITECTURES["UNet2DConditionModel"], TINY_UNET, abstract=True, attention="einsum")
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(np.float32) * 0.3), model.params
    )
    return model, params


def _ctx(seed, b=1):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((b, L, D)).astype(np.float32))


def _assert_finite_grads(grads):
    leaves = jax.tree_util.tree_leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)


# ------------------------------------------------------------------------------------- ESD and sampling


class Stub:
    """A 'UNet' whose prediction is scale * mean(context) + 0.1 x, with the scale a param leaf."""

    @staticmethod
    def apply(params, x, t, ctx):
        s = params["layer"]["attn2"]["kernel"]
        return 0.1 * x + s * jnp.mean(ctx, axis=(1, 2))[:, None, None, None]


def test_esd_target_sign_convention_on_hand_built_inputs():
    e_null, e_cond, e_from = jnp.full((2,), 1.0), jnp.full((2,), 3.0), jnp.full((2,), 5.0)
    np.testing.assert_allclose(esd.esd_target(e_null, e_cond, 2.0), -3.0)  # ε(∅) − η(ε(c) − ε(∅)) = 1 − 2·2
    np.testing.assert_allclose(esd.esd_target(e_null, e_cond, 2.0, e_from), 1.0)  # ε(c_f) − η(ε(c) − ε(∅))
    # the loss uses it with the frozen model for both ε* terms and the trainee for the prediction
    frozen = {"base": {"layer": {"attn2": {"kernel": jnp.float32(1.0)}}}}
    trainable = {"layer": {"attn2": {"kernel": jnp.float32(2.0)}}}
    batch = {"cond": jnp.full((1, L, D), 3.0), "uncond": jnp.full((1, L, D), 1.0)}
    for mode in esd.TIMESTEP_MODES:
        for sampler in esd.SAMPLERS:
            loss = esd.make_loss(
                Stub, negative_guidance=1.0, ddim_steps=4, latent_shape=(2, 2, 1), sampler=sampler, timestep_mode=mode
            )
            value, aux = loss(trainable, frozen, batch, jax.random.PRNGKey(0))
            # x cancels: pred − target = (2·3) − (1·1 − (1·3 − 1·1)) = 6 − (−1) = 7
            assert float(value) == pytest.approx(49.0, rel=1e-5)
    assert [int(esd.compvis_steps(k, 50)) for k in (0, 1, 2, 49)] == [50, 50, 49, 2]


def test_esd_trains_on_full_captions_that_name_the_concept(monkeypatch):
    """Not captions cut after the concept ("a red"): the world captions whole ("a red circle on the left")."""
    from types import SimpleNamespace

    from jaxdiff.erase import finetune
    from jaxdiff.erase.config import base_config
    from jaxdiff.erase.job import Job

    config = base_config("esd")
    config.update(concept="red", templates=["a photo of {}"], num_prompts=4)
    job = SimpleNamespace(config=config, concepts=["red"], is_shapes=True, model=Stub, latent_shape=LATENT)
    job.pipe = SimpleNamespace(scheduler_config=None)
    job.concept_prompts = Job.prompts_for(job, job.concepts)
    job.concept_captions = Job.prompts_for(job, job.concepts, cut=False)
    assert "a red" in job.concept_prompts  # the cut caption ESD trained on before
    full = [p for p in job.concept_captions if p not in job.concept_prompts]
    assert full and all(" red " in p for p in full)
    names = []  # the "embedding" of a prompt is its index here

    def context(prompts):
        names.extend(p for p in prompts if p not in names)
        return np.asarray([names.index(p) for p in prompts])

    job.context = context
    job.config.esd = dict(negative_guidance=1.0, start_guidance=3.0, ddim_steps=4, sampler="trainee")
    job.config.esd.update(timestep_mode="compvis", erase_from="")
    job.config.train = dict(batch_size=1)
    monkeypatch.setattr(finetune, "train_selected", lambda job, loss, batch_fn: (batch_fn, {}))
    batch_fn = esd.run(job).unet_params
    trained = {names[int(batch_fn(i)["cond"][0])] for i in range(64)}
    assert trained & set(full) and not trained & {"a red"}


def test_ablation_doco_and_all_but_one_train_on_full_captions_and_their_anchored_twins(monkeypatch):
    """Concept Ablation and DoCo (anchor images of the anchor captions) and All but One encode the concept's full
    captions ("a red circle on the left", not the cut "a red") and the same captions with the anchor in place."""
    from types import SimpleNamespace

    from jaxdiff.erase import all_but_one, finetune
    from jaxdiff.erase.config import base_config
    from jaxdiff.erase.job import Job

    config = base_config("all_but_one")
    config.update(concept="red", anchor="blue", templates=["a photo of {}"], num_prompts=4)
    job = SimpleNamespace(config=config, concepts=["red"], anchor="blue", is_shapes=True, latent_shape=LATENT)
    job.concept_prompts = Job.prompts_for(job, job.concepts)
    job.concept_captions = Job.prompts_for(job, job.concepts, cut=False)
    full = [p for p in job.concept_captions if p not in job.concept_prompts]
    assert "a red" in job.concept_prompts and full and all(" red " in p for p in full)
    job.replaced = functools.partial(Job.replaced, job)
    job.anchor_captions = Job.anchored(job, job.concept_captions)
    twins = {p.replace(" red ", " blue ") for p in full}
    assert twins <= set(job.anchor_captions)
    encoded, drawn = set(), []
    job.context = lambda prompts: encoded.update(prompts) or jnp.zeros((len(prompts), L, D))
    job.images = lambda prompts, latents: drawn.extend(prompts) or np.zeros((len(prompts), 8, 8, 3))
    job.latents_of = lambda images: jnp.zeros((len(images), *LATENT))

    Job.anchor_data(job, 2 * len(job.concept_captions))  # Concept Ablation's and DoCo's data
    assert set(full) <= encoded and twins <= set(drawn) <= encoded and "a red" not in encoded
    assert "a blue" not in drawn

    encoded.clear()
    job.model, job.pipe = Stub, SimpleNamespace(scheduler_config=None)
    job.config.all_but_one = dict(
        drift_weight=1.0, guidance_target_scale=1.0, start_guidance=3.0, ddim_steps=4, sampler="frozen"
    )
    job.config.train = dict(batch_size=1)
    monkeypatch.setattr(finetune, "train_selected", lambda job, loss, batch_fn: (batch_fn, {}))
    all_but_one.run(job)
    assert set(full) | twins <= encoded and not encoded & {"a red", "a blue"}


def test_partial_sample_runs_the_first_steps_of_the_plan():
    sched = common.ddim()
    plan = sched.plan(5)
    params = {"layer": {"attn2": {"kernel": jnp.float32(0.5)}}}
    x_T = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 2, 1)).astype(np.float32))
    cond, uncond = jnp.full((1, L, D), 2.0), jnp.zeros((1, L, D))
    run = jax.jit(lambda n: common.partial_sample(Stub, params, sched, plan, x_T, cond, uncond, 3.0, n))
    x = x_T
    for k in range(6):
        np.testing.assert_allclose(np.asarray(run(k)), np.asarray(x), rtol=1e-5, atol=1e-6)
        if k < 5:
            t = plan.timesteps[k]
            ec, eu = Stub.apply(params, x, t, cond), Stub.apply(params, x, t, uncond)
            x, _ = sched.step(plan, eu + 3.0 * (ec - eu), k, x)


def test_ddim_trajectory_records_every_step():
    sched = common.ddim()
    plan = sched.plan(4)
    params = {"layer": {"attn2": {"kernel": jnp.float32(0.5)}}}
    x_T = jnp.asarray(np.random.default_rng(1).standard_normal((2, 2, 2, 1)).astype(np.float32))
    cond, uncond = jnp.full((2, L, D), 2.0), jnp.zeros((2, L, D))
    before, after, eps_pred, ts = common.ddim_trajectory(Stub, params, sched, plan, x_T, cond, uncond, 7.5)
    assert before.shape == after.shape == eps_pred.shape == (4, 2, 2, 2, 1) and ts.shape == (4,)
    np.testing.assert_array_equal(np.asarray(before[0]), np.asarray(x_T))
    np.testing.assert_array_equal(np.asarray(before[1:]), np.asarray(after[:-1]))
    partial = common.partial_sample(Stub, params, sched, plan, x_T, cond, uncond, 7.5, 3)
    np.testing.assert_allclose(np.asarray(after[2]), np.asarray(partial), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- SPM


def test_spm_adapter_at_init_leaves_the_model_unchanged(tiny):
    model, params = tiny
    ads = spm.init_adapters(params, jax.random.PRNGKey(1))
    assert ads and all("attentions_" in name for name in ads)
    assert adapters.num_params(ads) > 0
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, *LATENT)).astype(np.float32))
    t, c = jnp.array([10.0, 700.0]), _ctx(2, 2)
    apply = jax.jit(lambda p: model.apply(p, x, t, c))
    before = np.asarray(apply(params))
    after = np.asarray(apply(adapters.merge(params, ads)))
    assert np.max(np.abs(after - before)) <= 1e-6
    # a trained (non-zero) adapter changes it; two SPMs compose with γ² scaling (official FT)
    name = next(iter(ads))
    trained = {**ads, name: {**ads[name], "up": jnp.ones_like(ads[name]["up"])}}
    assert np.max(np.abs(np.asarray(apply(adapters.merge(params, trained))) - before)) > 1e-4
    merged = spm.apply_spms(params, [(trained, 0.5), (trained, 0.25)], power=2)
    key = tuple(name.split("/")) + ("kernel",)
    delta = selectors.flatten(merged)[key] - selectors.flatten(params)[key]
    np.testing.assert_allclose(
        np.asarray(delta), (0.25 + 0.0625) * np.asarray(adapters.delta(trained[name])), rtol=1e-5, atol=1e-7
    )


def test_facilitated_transport_gamma():
    ids = np.array([[0, 5, 6, 1, 1, 1], [0, 6, 7, 8, 1, 1], [0, 9, 1, 1, 1, 1]], np.int32)
    emb = jnp.asarray(np.random.default_rng(0).standard_normal((3, L, D)).astype(np.float32))
    enc = Encoded(emb, ids, np.array([4, 5, 3]), ())
    assert spm.transport_gamma(enc, 0, enc[0]) == pytest.approx(1.0)
    tokenuni = spm.transport_gamma(enc, 1, enc[0], metric="tokenuni")
    assert tokenuni == pytest.approx(0.5)  # {6, 7, 8} ∩ {5, 6} over {5, 6}
    cos = float(np.dot(np.ravel(emb[2]), np.ravel(emb[0])) / np.linalg.norm(emb[2]) / np.linalg.norm(emb[0]))
    assert spm.transport_gamma(enc, 2, enc[0], metric="clipcos") == pytest.approx(cos, rel=1e-5)
    assert spm.transport_gamma(enc, 2, enc[0]) == pytest.approx(max(cos, 0.0), rel=1e-5)


def test_spm_anchors():
    c = _ctx(3, 2)
    a = spm.sample_anchors(jax.random.PRNGKey(0), c, 4)
    assert a.shape == (2, 4, L, D)
    ratio = np.linalg.norm(np.asarray(a).reshape(2, 4, -1), axis=-1) / np.linalg.norm(
        np.asarray(c).reshape(2, 1, -1), axis=-1
    )
    assert np.all((ratio >= 0.8 - 1e-5) & (ratio <= 1.2 + 1e-5)) and np.std(ratio) > 0


class TokenStub:
    """A 'UNet' whose prediction is 0.1 x + mean over tokens of tanh(context @ kernel): nonlinear in the context,
    so the anchoring loss depends on which contexts it sees; an adapter on layer/attn2 changes the kernel."""

    @staticmethod
    def apply(params, x, t, ctx):
        w = params["layer"]["attn2"]["kernel"]
        return 0.1 * x + jnp.mean(jnp.tanh(ctx @ w), axis=1)[:, None, None, :]


def _official_spm_anchoring_loss(x, uncond, anchors, kernel_edited, kernel_original):
    """numpy transcription of the official L_LA at batch 1 (Con6924/SPM train_spm.py, sampling.sample,
    train_util.predict_noise with guidance_scale=1, prompt.py _erase_with_la's MSELoss)."""

    def unet(latents, embeddings, kernel):
        return 0.1 * latents + np.tanh(embeddings @ kernel).mean(axis=1)[:, None, None, :]

    def predict_noise(latents, text_embeddings, kernel, guidance_scale=1.0):
        noise_pred = unet(np.concatenate([latents] * 2), text_embeddings, kernel)
        noise_pred_uncond, noise_pred_text = np.split(noise_pred, 2)
        return noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)

    samples = np.concatenate([np.concatenate([uncond, s[None]]) for s in anchors])  # [u, a_1, u, a_2, ...]
    repeated = np.repeat(x, len(anchors), axis=0)  # denoised_latents.repeat(repeat, 1, 1, 1), batch 1
    anchor_latents = predict_noise(repeated, samples, kernel_edited)
    anchor_latents_ori = predict_noise(repeated, samples, kernel_original)
    return np.mean((anchor_latents - anchor_latents_ori) ** 2)


def test_spm_anchoring_loss_is_the_official_batch_with_the_unconditional_in_front_of_each_anchor(monkeypatch):
    rng = np.random.default_rng(0)
    k = 4
    x = rng.standard_normal((1, 2, 2, 3)).astype(np.float32)
    uncond, target = (rng.standard_normal((1, L, D)).astype(np.float32) for _ in range(2))
    anchors = rng.standard_normal((1, k, L, D)).astype(np.float32)
    kernel = rng.standard_normal((D, 3)).astype(np.float32) * 0.5
    adapter = {
        "layer/attn2": {"down": rng.standard_normal((D, 1)).astype(np.float32), "up": np.ones((1, 3), np.float32)}
    }
    monkeypatch.setattr(spm, "sample_anchors", lambda key, tar, num: jnp.asarray(anchors[:, :num]))
    monkeypatch.setattr(common, "partial_sample", lambda *args: jnp.asarray(x))
    loss = spm.make_loss(TokenStub, num_anchors=k, max_denoising_steps=3, latent_shape=x.shape[1:])
    batch = {name: jnp.asarray(target) for name in ("target", "positive", "surrogate")}
    batch["uncond"] = jnp.asarray(uncond)
    frozen = {"base": {"layer": {"attn2": {"kernel": jnp.asarray(kernel)}}}}
    _, aux = loss(adapter, frozen, batch, jax.random.PRNGKey(0))
    edited = kernel + adapter["layer/attn2"]["down"] @ adapter["layer/attn2"]["up"]
    expected = _official_spm_anchoring_loss(x, uncond, anchors[0], edited, kernel)
    np.testing.assert_allclose(float(aux["anchor"]), expected, rtol=1e-4)
    # the rows it keeps: (u, a_3, u, a_4), not the four anchors
    _, _, contexts = spm.anchoring_batch(jnp.asarray(x), jnp.zeros(1), jnp.asarray(uncond), jnp.asarray(anchors))
    for row, want in zip(contexts, [uncond[0], anchors[0, 2], uncond[0], anchors[0, 3]]):
        np.testing.assert_array_equal(np.asarray(row), want)


# ---------------------------------------------------------------------------------------------- DoCo


def test_doco_gradient_surgery_against_the_formula():
    rng = np.random.default_rng(0)
    g_u = {
        "a": jnp.asarray(rng.standard_normal((3, 4)).astype(np.float32)),
        "b": jnp.asarray(rng.standard_normal(5).astype(np.float32)),
    }
    g_r = {
        "a": -g_u["a"] + 0.3 * jnp.asarray(rng.standard_normal((3, 4)).astype(np.float32)),
        "b": jnp.asarray(rng.standard_normal(5).astype(np.float32)),
    }
    out = doco.gradient_surgery(g_u, g_r, lam=0.7)
    for k in g_u:
        u, r = np.asarray(g_u[k], np.float64).ravel(), np.asarray(g_r[k], np.float64).ravel()
        rn, un = r / (np.linalg.norm(r) + 1e-8), u / (np.linalg.norm(u) + 1e-8)
        cos = un @ rn
        expected = u - 0.7 * cos * rn if cos < 0 else u
        np.testing.assert_allclose(np.asarray(out[k]).ravel(), expected, rtol=1e-5, atol=1e-6)
    assert float(jnp.vdot(g_u["a"], g_r["a"])) < 0  # leaf "a" was in conflict
    # aligned gradients change nothing (bitwise)
    aligned = doco.gradient_surgery(g_u, jax.tree_util.tree_map(lambda g: 2.0 * g + 0.0, g_u))
    for k in g_u:
        assert np.array_equal(np.asarray(aligned[k]), np.asarray(g_u[k]))
    # with a unit-norm g_u and λ = 1 the conflicting component is removed exactly (PCGrad)
    unit = {"a": g_u["a"] / jnp.linalg.norm(g_u["a"])}
    fixed = doco.gradient_surgery(unit, {"a": g_r["a"]})
    assert abs(float(jnp.vdot(fixed["a"], g_r["a"]))) < 1e-5


class KVStub:
    """A 'UNet' with one cross-attention K/V pair: eps = x * (1 + mean(ctx @ to_k) + mean(ctx @ to_v))."""

    @staticmethod
    def apply(params, x, t, ctx):
        a = params["attn2"]
        s = jnp.mean(ctx @ a["to_k"]["kernel"], axis=(1, 2)) + jnp.mean(ctx @ a["to_v"]["kernel"], axis=(1, 2))
        return x * (1.0 + s[:, None, None, None]) + 0.01 * t[:, None, None, None] / 1000


def _doco_reference_step(method, unet_opt, disc_opt):
    """DoCo's step as it was before the runner (jaxdiff 7c51171, erase/doco.py::make_step): the oracle."""

    def step(s, frozen, batch, rng):
        g, aux = method.unet_grads(s["unet"], {**frozen, "disc": s["disc"]}, batch, rng)
        active = s["step"] > method.warm_up
        updates, opt_state = unet_opt.update(g, s["unet_opt"], s["unet"])
        trainable = optax.apply_updates(s["unet"], updates)
        pick = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(active, a, b), new, old)  # noqa: E731
        trainable, opt_state = pick(trainable, s["unet"]), pick(opt_state, s["unet_opt"])
        adv_weight = jnp.where(active, 1.0, 0.0) if method.disc_grad_includes_adv else 0.0
        (_, _), g_d = jax.value_and_grad(method.disc_loss, has_aux=True)(
            s["disc"], aux["x0_anchor"], aux["x0_target"], adv_weight
        )
        d_updates, disc_opt_state = disc_opt.update(g_d, s["disc_opt"], s["disc"])
        disc = optax.apply_updates(s["disc"], d_updates)
        return {
            "step": s["step"] + 1,
            "unet": trainable,
            "unet_opt": opt_state,
            "disc": disc,
            "disc_opt": disc_opt_state,
        }

    return step


def _doco_on_the_runner(method):
    """(params, trainable, disc, batch, unet_opt, disc_opt, state, compiled runner step) of DoCo on KVStub."""
    from jaxdiff.train import state as state_lib
    from jaxdiff.train import step as step_lib

    rng = np.random.default_rng(4)
    params = {
        "attn2": {n: {"kernel": jnp.asarray(rng.standard_normal((D, 3)).astype(np.float32))} for n in ("to_k", "to_v")}
    }
    trainable, _ = selectors.split(params, "cross-attn-kv")
    unet_opt, disc_opt = optax.adamw(1e-2, weight_decay=1e-2), optax.adam(1e-2, b1=0.5)
    disc = method.init_disc(jax.random.PRNGKey(0), LATENT)
    batch = {
        "latents": jnp.asarray(rng.standard_normal((2, *LATENT)).astype(np.float32)),
        "target": _ctx(5, 2),
        "anchor": _ctx(6, 2),
        "prior_latents": jnp.asarray(rng.standard_normal((2, *LATENT)).astype(np.float32)),
        "prior": _ctx(6, 2),
    }
    networks = {"unet": step_lib.Network("unet", unet_opt), "disc": step_lib.Network("disc", disc_opt)}
    masks = {k: jax.tree_util.tree_map(lambda _: True, v) for k, v in {"unet": trainable, "disc": disc}.items()}
    state = state_lib.create({"unet": trainable, "disc": disc}, {"unet": unet_opt, "disc": disc_opt}, masks, seed=3)
    step = fast_jit(step_lib.build(networks, method.phases(), masks))
    return params, trainable, disc, batch, unet_opt, disc_opt, state, step


def test_doco_on_the_runner_equals_its_pre_runner_step_and_trains_the_unet_only_after_warm_up():
    method = doco.DoCo(KVStub, disc_channels=(8, 16), warm_up=1)
    params, trainable, disc, batch, unet_opt, disc_opt, state, step = _doco_on_the_runner(method)
    reference = fast_jit(_doco_reference_step(method, unet_opt, disc_opt))
    ref = {"step": jnp.int32(0), "unet": trainable, "unet_opt": unet_opt.init(trainable), "disc": disc}
    ref["disc_opt"] = disc_opt.init(disc)

    def equal(a, b):
        return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))

    for k in range(3):
        new, m = step(state, batch, {"base": params})
        # the runner's rng for phase 0 of step k: fold_in(fold_in(PRNGKey(seed), k), 0)
        ref = reference(ref, {"base": params}, batch, jax.random.fold_in(jax.random.fold_in(state.rng, k), 0))
        assert bool(m["ok"]) and all(np.isfinite(float(v)) for key, v in m.items() if key != "finite")
        assert not equal(new.params["disc"], state.params["disc"])  # the discriminator trains every step
        assert equal(new.params["unet"], state.params["unet"]) == (k <= 1)  # the UNet once global_step > warm_up
        assert equal(new.opt_state["unet"], state.opt_state["unet"]) == (k <= 1)
        for ours, theirs in [("unet", "unet"), ("disc", "disc")]:
            assert tw_max_abs_diff(new.params[ours], ref[theirs]) <= 1e-6
        assert tw_max_abs_diff(new.opt_state["disc"], ref["disc_opt"]) <= 1e-6
        assert tw_max_abs_diff(new.opt_state["unet"], ref["unet_opt"]) <= 1e-6
        state = new
    assert int(state.step) == 3


def test_doco_logs_the_discriminator_accuracy_and_updates_no_unet_weight_during_its_warm_up(tmp_path):
    warm_up = 2
    method = doco.DoCo(KVStub, disc_channels=(8, 16), warm_up=warm_up)
    params, trainable, _, batch, _, _, state, step = _doco_on_the_runner(method)
    first = state.params["unet"]
    for k in range(warm_up + 2):
        state, m = step(state, batch, {"base": params})
        assert 0.0 <= float(m["d_acc_anchor_disc"]) <= 1.0 and 0.0 <= float(m["d_acc_target_disc"]) <= 1.0
        unchanged = tw_max_abs_diff(state.params["unet"], first) == 0.0
        assert unchanged == (k <= warm_up)  # steps 0..warm_up train D alone (the official global_step > warm_up)
    logits = jnp.asarray([[-1.0, 2.0], [-3.0, -0.5]])
    acc = doco.discriminator_accuracy(logits, logits)  # anchor: 3 of 4 patches < 0; target: 1 of 4 > 0
    assert float(acc["d_acc_anchor"]) == 0.75 and float(acc["d_acc_target"]) == 0.25
    rows = [{"step": s, "loss": 1.0, "d_acc_anchor_disc": s / 10, "d_acc_target_disc": 0.5} for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = doco.accuracy_report(str(tmp_path), warm_up=2)
    assert report["disc_accuracy_warm_up"] == {"step": 3, "d_acc_anchor_disc": 0.3, "d_acc_target_disc": 0.5}
    assert report["disc_accuracy_final"]["step"] == 4


def test_doco_shapes_preset_warms_up_for_half_its_steps_as_the_official_defaults():
    """The official 1000 discriminator-only steps of 2000; the :shapes preset's 20 of 300 left D at chance."""
    from test_erase_closed_form import _load_config

    for c in (_load_config("doco"), _load_config("doco", "shapes")):
        assert 2 * c.doco.warm_up >= c.train.steps


def tw_max_abs_diff(a, b) -> float:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0)) for x, y in zip(la, lb)
    )


def test_trce_hinge_and_never_zeroed_gradients():
    tx = trce.never_zeroed_gradients()
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    out1, state = tx.update({"w": jnp.array([1.0, 0.0, 0.0])}, state)
    out2, state = tx.update({"w": jnp.array([0.0, 2.0, 0.0])}, state)
    np.testing.assert_array_equal(np.asarray(out2["w"]), [1.0, 2.0, 0.0])  # step 2 uses g1 + g2
    assert isinstance(trce.stage2_optimizer(never_zero_grads=True), optax.GradientTransformation)


def test_trce_stage2_epoch_is_one_random_early_step_per_trajectory():
    """As the official loop (3 epochs over the trajectories, k ~ U{0..25} each), not every (trajectory, step) pair."""
    trajectories, early, epochs = 10, 26, 3
    picks = [trce.stage2_sample(i, trajectories, early, seed=0) for i in range(epochs * trajectories)]
    for e in range(epochs):
        assert sorted(j for j, _ in picks[e * trajectories : (e + 1) * trajectories]) == list(range(trajectories))
    ks = [k for _, k in picks]
    assert min(ks) >= 0 and max(ks) < early and len(set(ks)) > 5
    assert picks == [trce.stage2_sample(i, trajectories, early, seed=0) for i in range(epochs * trajectories)]


def test_ablation_masked_reduction_is_the_official_one():
    pred, target = jnp.ones((2, 4, 4, 3)), jnp.zeros((2, 4, 4, 3))
    assert float(ablation.masked_loss(pred, target)) == pytest.approx(3.0)  # C x the elementwise mean
    mask = jnp.zeros((2, 4, 4, 1)).at[:, :2].set(1.0)
    assert float(ablation.masked_loss(pred.at[:, 2:].set(9.0), target, mask)) == pytest.approx(3.0)


def test_doco_prior_pool_is_the_anchor_or_the_anchor_and_the_preserved_concepts():
    """DoCo's L_prior / surgery pool: the anchor images (official), or with prior_concepts="anchor+preserved" also
    train.retain_images images of the preserved concepts (Job.retain_data); a bad value or no preserved concept is
    a clear error."""
    from types import SimpleNamespace

    import ml_collections as mlc

    from jaxdiff.errors import UserError

    z, anchor = jnp.zeros((3, *LATENT)), jnp.zeros((3, L, D))
    asked = []

    def retain_data(n):
        asked.append(n)
        return jnp.ones((n, *LATENT)), jnp.ones((n, L, D))

    config = mlc.ConfigDict({"doco": {"prior_concepts": "anchor"}, "train": {"retain_images": 5}})
    job = SimpleNamespace(config=config, preserve=["green", "blue"], retain_data=retain_data)
    pz, pc = doco.prior_data(job, z, anchor)
    assert pz is z and pc is anchor and not asked
    config.doco.prior_concepts = "anchor+preserved"
    pz, pc = doco.prior_data(job, z, anchor)
    assert asked == [5] and pz.shape == (8, *LATENT) and pc.shape == (8, L, D)
    np.testing.assert_array_equal(pz[:3], z)
    np.testing.assert_array_equal(pc[3:], jnp.ones((5, L, D)))
    job.preserve = []
    with pytest.raises(UserError, match="needs preserved concepts"):
        doco.prior_data(job, z, anchor)
    config.doco.prior_concepts = "preserved"
    with pytest.raises(UserError, match="anchor, anchor\\+preserved"):
        doco.prior_data(job, z, anchor)
