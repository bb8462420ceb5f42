"""A NaN injected into the data, or an infinite gradient, is detected and named; "skip" skips the update, "stop"
stops the run; a non-finite checkpoint is never written."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_worker as tw

from jaxdiff.train import checkpoint as ckpt_lib
from jaxdiff.train import loop
from jaxdiff.train import step as step_lib

# No shuffling: batch j holds records 8j..8j+7, so record 20 poisons batch 2, i.e. step 3.
OVERRIDES = (
    "--config.data.source=train_worker:nan_source",
    "--config.data.shuffle=false",
    "--config.checkpoint.every_steps=1",
    "--config.total_steps=4",
    "--config.mesh.data=1",
)


@pytest.fixture
def nan_at_step_3(monkeypatch):
    monkeypatch.setenv("NAN_INDEX", "20")


def test_nan_in_the_batch_stops_the_run_naming_the_loss_and_writes_no_checkpoint_of_it(tmp_path, nan_at_step_3):
    config = tw.tiny_config(*OVERRIDES, "--config.train.nonfinite=stop")
    with pytest.raises(step_lib.NonFiniteError) as info:
        loop.train(config, str(tmp_path), devices=jax.devices()[:1])
    message = str(info.value)
    assert message.startswith("step 3: non-finite loss = nan")
    assert "non-finite gradient in 208 of 208 param tensors: all" in message
    assert "last checkpoint: 2" in message
    assert tw.committed_steps(tmp_path) == [1, 2]
    state, _, _ = tw.load_state(tmp_path, 2, *OVERRIDES)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state.params))


def test_nan_in_the_batch_with_skip_leaves_that_step_s_params_unchanged(tmp_path, nan_at_step_3):
    config = tw.tiny_config(*OVERRIDES, "--config.train.nonfinite=skip", "--config.checkpoint.keep=4")
    result = loop.train(config, str(tmp_path), devices=jax.devices()[:1])
    assert result["step"] == 4 and result["skipped"] == 1
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [3]
    assert tw.committed_steps(tmp_path) == [1, 2, 3, 4]
    before, after, last = (tw.load_state(tmp_path, s, *OVERRIDES)[0] for s in (2, 3, 4))
    assert tw.bitwise_equal(after.params, before.params) and tw.bitwise_equal(after.opt_state, before.opt_state)
    assert int(after.step) == 3 and int(after.data_position) == 3  # the batch is consumed, not retried
    assert not tw.bitwise_equal(last.params, after.params)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(last))


def test_an_infinite_gradient_with_a_finite_loss_names_the_param():
    params = {"encoder": {"w": jnp.array([0.0, 1.0]), "b": jnp.ones(2)}, "head": {"w": jnp.ones(3)}}

    def loss_fn(p, frozen, batch, rng):  # d/dw sqrt|w| is infinite at w = 0
        return jnp.sum(jnp.sqrt(jnp.abs(p["encoder"]["w"]))) + jnp.sum(p["head"]["w"] ** 2) + 0 * batch["x"].sum(), {}

    networks = {"model": step_lib.Network("model", optax.sgd(0.1))}
    phases = [step_lib.Phase("model", "model", lambda p, *a: loss_fn(p["model"], *a))]
    masks = {"model": jax.tree_util.tree_map(lambda _: True, params)}
    from jaxdiff.train import state as state_lib

    state = state_lib.create({"model": params}, {"model": networks["model"].tx}, masks, seed=0)
    new, metrics = jax.jit(step_lib.build(networks, phases, masks))(state, {"x": jnp.ones(2)})
    names = step_lib.leaf_names({"model": params}, masks, phases)
    report = step_lib.nonfinite_report(jax.device_get(metrics), names, 1)
    assert report == "step 1: non-finite gradient in 1 of 3 param tensors: encoder/w"
    assert not bool(metrics["ok"])
    assert tw.bitwise_equal(new.params["model"], params) and int(new.step) == 1


def test_checkpointer_refuses_a_non_finite_state(tmp_path):
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path), keep=2)
    state = {"unet": {"conv": {"kernel": jnp.array([1.0, jnp.inf])}, "norm": jnp.ones(2)}, "step": jnp.int32(1)}
    with pytest.raises(ckpt_lib.NonFiniteCheckpointError, match="unet/conv/kernel"):
        checkpointer.save(1, state, {}, {})
    checkpointer.save(2, {"unet": {"norm": jnp.ones(2)}}, {}, {})
    checkpointer.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["2"]
