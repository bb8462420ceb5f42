"""The step: gradient accumulation equals the full batch, phases train only their leaves with their own optimiser
state, EMA follows its formula, remat (on the loss or per UNet block) leaves gradients unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_worker as tw
from jax.sharding import NamedSharding, PartitionSpec

from jaxdiff import sharding
from jaxdiff.models.model import create
from jaxdiff.models.unet import ARCHITECTURES
from jaxdiff.train import objectives
from jaxdiff.train import state as state_lib
from jaxdiff.train import step as step_lib


def _regression():
    rng = np.random.default_rng(0)
    params = {
        "generator": {"layer": {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32), "b": jnp.zeros(2)}},
        "critic": {"w": jnp.ones((2,))},
    }
    batch = {
        "x": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32),
        "y": jnp.asarray(rng.standard_normal((8, 2)), jnp.float32),
    }

    def loss_fn(p, frozen, b, r):
        pred = b["x"] @ p["generator"]["layer"]["w"] + p["generator"]["layer"]["b"]
        return jnp.mean((pred - b["y"]) ** 2), {"mean_pred": jnp.mean(pred)}

    return params, batch, loss_fn


def _run(networks, phases, params, batch, steps=2, **options):
    networks = {n.name: n for n in networks}
    masks = {n: state_lib.mask(params[n], net.trainable) for n, net in networks.items()}
    ema = tuple(n for n, net in networks.items() if net.ema_decay > 0)
    params = {n: params[n] for n in networks}
    state = state_lib.create(params, {n: net.tx for n, net in networks.items()}, masks, seed=0, ema=ema)
    fn = jax.jit(step_lib.build(networks, phases, masks, step_lib.Options(**options)))
    for _ in range(steps):
        state, metrics = fn(state, batch)
    return state, metrics


def test_gradient_accumulation_over_micro_batches_equals_the_full_batch():
    params, batch, loss_fn = _regression()
    net = [step_lib.Network("generator", optax.adam(1e-2), trainable="layer/")]
    phase = [step_lib.Phase("model", "generator", loss_fn)]
    full, m_full = _run(net, phase, params, batch)
    mesh = sharding.make_mesh({"data": 2}, jax.devices()[:2])
    sharded = {k: jax.device_put(v, NamedSharding(mesh, PartitionSpec("data"))) for k, v in batch.items()}
    accumulated, m_acc = _run(
        net, phase, params, sharded, accum_steps=4, batch_sharding=NamedSharding(mesh, PartitionSpec("data"))
    )
    assert tw.max_abs_diff(accumulated.params, full.params) <= 1e-6
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_full["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_acc["mean_pred"]), float(m_full["mean_pred"]), rtol=1e-5)


def test_networks_train_in_phases_with_their_own_optimiser_state_and_ema():
    params, batch, loss_fn = _regression()
    params["generator"]["frozen_scale"] = jnp.ones(2)

    def critic_loss(p, frozen, b, r):
        return jnp.sum((p["critic"]["w"] - 3.0) ** 2), {"produced": {"w_after": p["critic"]["w"] * 1.0}}

    def generator_loss(p, frozen, b, r):
        # reads what the critic phase produced in the same step (its params before its update)
        loss, aux = loss_fn(p, frozen, b, r)
        return loss + 0.0 * jnp.sum(frozen["produced"]["critic"]["w_after"]), aux

    networks = [
        step_lib.Network("critic", optax.sgd(0.1), ema_decay=0.5),
        step_lib.Network(
            "generator", optax.adam(1e-2), trainable=lambda path, leaf: path.startswith("layer"), ema_decay=0.5
        ),
    ]
    phases = [step_lib.Phase("critic", "critic", critic_loss), step_lib.Phase("generator", "generator", generator_loss)]
    state, metrics = _run(networks, phases, params, batch, steps=1)
    assert set(state.opt_state) == {"critic", "generator"}
    np.testing.assert_allclose(state.params["critic"]["w"], 1.0 + 0.1 * 2 * 2.0)  # one SGD step on (w-3)^2
    assert not np.allclose(state.params["generator"]["layer"]["w"], params["generator"]["layer"]["w"])
    np.testing.assert_array_equal(state.params["generator"]["frozen_scale"], 1.0)  # outside the mask: not trained
    assert {"loss_critic", "loss_generator", "grad_norm_critic", "grad_norm_generator"} <= set(metrics)
    # EMA of each network's trainable leaves: decay * initial + (1 - decay) * updated
    np.testing.assert_allclose(state.ema["critic"]["w"], 0.5 * 1.0 + 0.5 * state.params["critic"]["w"], rtol=1e-6)
    np.testing.assert_allclose(
        state.ema_params("generator")["layer"]["b"],
        0.5 * 0.0 + 0.5 * np.asarray(state.params["generator"]["layer"]["b"]),
        rtol=1e-6,
        atol=1e-7,
    )


def test_a_repeated_phase_updates_k_times_and_an_inactive_phase_not_at_all():
    params, batch, _ = _regression()

    def critic_loss(p, frozen, b, r):
        return jnp.sum((p["critic"]["w"] - 3.0) ** 2), {}

    networks = [step_lib.Network("critic", optax.sgd(0.1)), step_lib.Network("generator", optax.sgd(0.1))]
    gen_loss = lambda p, f, b, r: (jnp.sum(p["generator"]["layer"]["b"] ** 2 - p["generator"]["layer"]["b"]), {})
    phases = [
        step_lib.Phase("critic", "critic", critic_loss, repeat=3),
        step_lib.Phase("generator", "generator", gen_loss, active=lambda step: step >= 1),
    ]
    state, _ = _run(networks, phases, params, batch, steps=1)
    w = 1.0
    for _ in range(3):
        w = w - 0.1 * 2 * (w - 3.0)
    np.testing.assert_allclose(state.params["critic"]["w"], w, rtol=1e-6)
    np.testing.assert_array_equal(state.params["generator"]["layer"]["b"], 0.0)  # step 0: not active yet
    state, _ = _run(networks, phases, params, batch, steps=2)
    np.testing.assert_allclose(state.params["generator"]["layer"]["b"], 0.1, rtol=1e-6)  # active at step 1


def test_a_selector_that_selects_nothing_is_a_clear_error():
    params, _, _ = _regression()
    with pytest.raises(ValueError, match="selects no parameter"):
        state_lib.mask(params, "attn2/to_k")


TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


@pytest.mark.parametrize("remat", ["loss", "blocks"])
def test_remat_leaves_the_gradients_unchanged(remat):
    model = create(ARCHITECTURES["UNet2DConditionModel"], TINY_UNET, abstract=False, attention="einsum", seed=1)
    rng = np.random.default_rng(0)
    batch = {
        "latents": jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32),
        "encoder_hidden_states": jnp.asarray(rng.standard_normal((2, 3, 32)), jnp.float32),
    }
    cfg = tw.tiny_config().objective
    apply_fn = objectives.remat_blocks(model.apply, objectives.unet_block_types()) if remat == "blocks" else model.apply
    plain = objectives.denoising_loss(model.apply, cfg)
    remat_loss = objectives.denoising_loss(apply_fn, cfg)
    if remat == "loss":
        remat_loss = step_lib._remat(remat_loss, "loss")
    key = jax.random.PRNGKey(0)
    grad = lambda f: jax.jit(jax.grad(lambda p: f(p, None, batch, key)[0]))(model.params)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: remat_loss(p, None, batch, key)[0]))(model.params))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
    assert tw.max_abs_diff(grad(remat_loss), grad(plain)) <= 1e-5


def test_bf16_compute_keeps_float32_master_params():
    from jaxdiff.train import loop

    s = loop.setup(tw.tiny_config("--config.model.compute_dtype=bfloat16", "--config.mesh.data=1"), jax.devices()[:1])
    assert {x.dtype for x in jax.tree_util.tree_leaves(s.abstract_state.params)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree_util.tree_leaves(s.abstract_state.opt_state) if x.ndim} == {jnp.dtype("float32")}
    batch = {"latents": jnp.zeros((8, 8, 8, 4)), "encoder_hidden_states": jnp.zeros((8, 4, 32))}
    step = step_lib.build(s.networks, s.phases, s.masks)
    jaxpr = jax.make_jaxpr(step)(s.abstract_state, batch)  # traced only, nothing compiled
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("dot_general", "conv_general_dilated")]
    assert len(dots) > 50  # forward and backward matmuls (convolutions are im2col matmuls at these sizes)
    assert {str(e.outvars[0].aval.dtype) for e in dots} == {"bfloat16"}
    new_state, _ = jax.eval_shape(step, s.abstract_state, batch)
    assert {x.dtype for x in jax.tree_util.tree_leaves(new_state.params)} == {jnp.dtype("float32")}
