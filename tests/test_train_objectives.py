"""The denoising objective against diffusers (DDPMScheduler noising, velocity; min-SNR weights as in its training
scripts), and the metrics writer: JSONL records and TensorBoard event files with valid TFRecord framing."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.train import objectives
from jaxdiff.train import writer as writer_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def test_noising_velocity_and_snr_match_diffusers_ddpm():
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    acp = objectives.alphas_cumprod(1000, "scaled_linear", 0.00085, 0.012)
    np.testing.assert_allclose(acp, sched.alphas_cumprod.numpy(), rtol=1e-6)
    rng = np.random.default_rng(0)
    x0, noise = (
        rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
        rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
    )
    t = np.array([3, 871])
    ref_noisy = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    ref_v = sched.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    from jaxdiff.sampling.schedulers import common

    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(
        common.add_noise(acp, nhwc(x0), nhwc(noise), t), ref_noisy.transpose(0, 2, 3, 1), atol=1e-6
    )
    np.testing.assert_allclose(common.velocity(acp, nhwc(x0), nhwc(noise), t), ref_v.transpose(0, 2, 3, 1), atol=1e-6)

    from diffusers.training_utils import compute_snr

    ref_snr = compute_snr(sched, torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(objectives.snr(acp, jnp.asarray(t)), ref_snr, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_paper(prediction_type):
    # diffusers examples/text_to_image/train_text_to_image.py: min(snr, gamma) / snr, or / (snr + 1) for v
    snr = jnp.array([0.01, 1.0, 5.0, 30.0])
    w = objectives.min_snr_weight(snr, 5.0, prediction_type)
    denominator = snr + 1 if prediction_type == "v_prediction" else snr
    np.testing.assert_allclose(w, np.minimum(snr, 5.0) / denominator, rtol=1e-6)


def test_denoising_loss_is_the_weighted_mse_to_the_target():
    import ml_collections as mlc

    from jaxdiff.train.config import default_config

    cfg = mlc.ConfigDict(default_config().objective)
    cfg.prediction_type, cfg.snr_gamma = "v_prediction", 5.0
    x0 = jnp.ones((3, 4, 4, 2))
    batch = {"latents": x0, "encoder_hidden_states": jnp.zeros((3, 1, 4))}
    loss_fn = objectives.denoising_loss(lambda p, x, t, c: p * x, cfg)  # "model" = scale the noisy input
    loss, aux = loss_fn(jnp.float32(0.0), None, batch, jax.random.PRNGKey(1))
    # with a zero prediction the per-example mse is mean(v^2); recompute from the same draws
    acp = objectives.alphas_cumprod()
    noise_rng, t_rng = jax.random.split(jax.random.PRNGKey(1))
    noise = jax.random.normal(noise_rng, x0.shape)
    t = jax.random.randint(t_rng, (3,), 0, 1000)
    from jaxdiff.sampling.schedulers import common

    mse = jnp.mean(common.velocity(acp, x0, noise, t) ** 2, axis=(1, 2, 3))
    expected = jnp.mean(objectives.min_snr_weight(objectives.snr(acp, t), 5.0, "v_prediction") * mse)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(aux["mse"], jnp.mean(mse), rtol=1e-6)


def test_denoising_loss_passes_sdxl_text_time_conditioning_to_the_unet():
    import ml_collections as mlc

    from jaxdiff.train.config import default_config

    cfg = mlc.ConfigDict(default_config().objective)
    seen = []

    def unet(p, x, t, c, added=None):
        seen.append(added)
        return p * x

    batch = {"latents": jnp.ones((2, 4, 4, 2)), "encoder_hidden_states": jnp.zeros((2, 1, 4))}
    objectives.denoising_loss(unet, cfg)(jnp.float32(0.0), None, batch, jax.random.PRNGKey(0))
    sdxl = dict(batch, text_embeds=jnp.ones((2, 3)), time_ids=jnp.full((2, 6), 512.0))
    objectives.denoising_loss(unet, cfg)(jnp.float32(0.0), None, sdxl, jax.random.PRNGKey(0))
    assert seen[0] is None and set(seen[1]) == {"text_embeds", "time_ids"}
    np.testing.assert_array_equal(seen[1]["time_ids"], sdxl["time_ids"])


def _read_records(path):
    data, out = open(path, "rb").read(), []
    while data:
        (length,) = struct.unpack("<Q", data[:8])
        (length_crc,) = struct.unpack("<I", data[8:12])
        payload = data[12 : 12 + length]
        (payload_crc,) = struct.unpack("<I", data[12 + length : 16 + length])
        assert length_crc == writer_lib._masked_crc(data[:8]) and payload_crc == writer_lib._masked_crc(payload)
        out.append(payload)
        data = data[16 + length :]
    return out


def test_metrics_writer_writes_jsonl_and_tensorboard_events(tmp_path):
    assert writer_lib.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    writer = writer_lib.MetricsWriter(
        str(tmp_path), total_steps=10, initial_step=0, images_per_step=8, step_flops=2e12, progress=False
    )
    writer.reset_timer(0)
    record = writer.write(2, {"loss": np.float32(0.5), "ok": np.bool_(True), "learning_rate": 1e-4})
    writer.close()
    assert record["images_per_s"] == pytest.approx(8 * record["steps_per_s"])
    assert record["tflops_per_s"] == pytest.approx(2 * record["steps_per_s"])
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["step"] == 2 and line["loss"] == 0.5 and line["ok"] is True
    (events,) = list((tmp_path / "tensorboard").iterdir())
    records = _read_records(events)
    assert b"brain.Event:2" in records[0]
    assert b"loss" in records[1] and struct.pack("<f", 0.5) in records[1] and b"tflops_per_s" in records[1]


def test_flops_from_xla_cost_analysis():
    compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 32)), jnp.ones((32, 16))).compile()
    assert writer_lib.flops_of(compiled) == pytest.approx(2 * 64 * 32 * 16, rel=0.1)
