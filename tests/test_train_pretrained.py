"""`model.pretrained`: training starts from a saved model's weights (passed to the initialiser, not baked into the
program) exactly as it would from the same weights initialised in place."""

import jax
import train_worker as tw

from jaxdiff.convert.checkpoint import save_checkpoint
from jaxdiff.models.model import create
from jaxdiff.models.unet import ARCHITECTURES
from jaxdiff.train import loop

OVERRIDES = ("--config.total_steps=2", "--config.checkpoint.every_steps=2", "--config.mesh.data=1")


def test_training_from_a_saved_model_equals_training_from_the_same_initial_weights(tmp_path):
    config = tw.tiny_config(*OVERRIDES)
    unet_config = {"_class_name": "UNet2DConditionModel", **config.model.unet.to_dict()}
    model = create(ARCHITECTURES["UNet2DConditionModel"], unet_config, abstract=False, seed=config.seed)
    save_checkpoint(tmp_path / "unet", model)

    devices = jax.devices()[:1]
    loop.train(config, str(tmp_path / "scratch"), devices=devices)
    pretrained = (*OVERRIDES, f"--config.model.pretrained={tmp_path / 'unet'}")
    loop.train(tw.tiny_config(*pretrained), str(tmp_path / "pretrained"), devices=devices)

    expected, _, _ = tw.load_state(tmp_path / "scratch", 2, *OVERRIDES)
    actual, _, _ = tw.load_state(tmp_path / "pretrained", 2, *pretrained)
    assert tw.bitwise_equal(actual.params, expected.params)
    assert not tw.bitwise_equal(actual.params["unet"], jax.device_get(model.params))  # it did train
