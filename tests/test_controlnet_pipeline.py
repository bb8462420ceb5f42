"""ControlNet guidance in the compiled sampling loop against diffusers' StableDiffusionControlNetPipeline: one net,
two nets (MultiControlNetModel) with per-net scales and step windows, guess mode; bad input."""

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline
from test_convert_io import _randomized, tiny_pipeline

from jaxdiff.errors import UserError
from jaxdiff.sampling.pipeline import load_pipeline

PROMPTS = ["a b c", "x y"]
SIZE = 16


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnpipe")
    folder = tiny_pipeline(root / "pipe")
    unet = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None).unet
    nets = []
    for seed in (3, 4):
        net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
        net = _randomized(net, seed)
        net.save_pretrained(root / f"cn{seed}")
        nets.append(root / f"cn{seed}")
    return folder, nets


def _images(n_nets, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 1, (len(PROMPTS), SIZE, SIZE, 3)).astype(np.float32) for _ in range(n_nets)]


CASES = {
    "one net, window": dict(nets=1, scale=0.8, start=0.0, end=0.6, guess=False),
    "two nets": dict(nets=2, scale=[0.5, 1.2], start=[0.2, 0.0], end=[1.0, 0.5], guess=False),
    "guess mode": dict(nets=1, scale=1.0, start=0.0, end=1.0, guess=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_controlnet_images_match_diffusers(folders, case):
    folder, net_folders = folders
    c = CASES[case]
    nets = net_folders[: c["nets"]]
    sd = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    refs = [ControlNetModel.from_pretrained(f) for f in nets]
    ref = StableDiffusionControlNetPipeline(**sd.components, controlnet=refs if len(refs) > 1 else refs[0])
    ref.set_progress_bar_config(disable=True)
    images = _images(len(nets))
    latents = np.random.default_rng(1).standard_normal((len(PROMPTS), SIZE // 2, SIZE // 2, 4)).astype(np.float32)
    expected = ref(
        PROMPTS,
        image=images if len(nets) > 1 else images[0],
        num_inference_steps=8,
        guidance_scale=6.0,
        latents=torch.from_numpy(latents).permute(0, 3, 1, 2),
        controlnet_conditioning_scale=c["scale"],
        control_guidance_start=c["start"],
        control_guidance_end=c["end"],
        guess_mode=c["guess"],
        output_type="np",
    ).images
    pipe = load_pipeline(folder, controlnet=nets)
    got = pipe(
        PROMPTS,
        steps=8,
        guidance=6.0,
        latents=latents,
        control_image=images,
        controlnet_scale=c["scale"],
        control_start=c["start"],
        control_end=c["end"],
        guess_mode=c["guess"],
    )
    assert 0.5 < np.mean((expected > 0.01) & (expected < 0.99)) and np.all(expected.std(axis=(1, 2)) > 0.02)
    err = float(np.max(np.abs(got - expected)))
    assert err <= 1e-3, f"max abs error {err:.3g}"
    plain = pipe(PROMPTS, steps=8, guidance=6.0, latents=latents)  # the control changed the images
    assert np.max(np.abs(plain - got)) > 1e-2


def test_bad_control_input_is_a_clear_error(folders, tmp_path):
    folder, net_folders = folders
    pipe = load_pipeline(folder, controlnet=net_folders)
    images = _images(2)
    cases = [
        (dict(control_image=images[:1]), "1 control images for 2 ControlNets"),
        (dict(control_image=images, controlnet_scale=[1.0]), "1 values of controlnet_scale for 2"),
        (dict(control_image=images, control_start=0.7, control_end=0.5), "0 <= start < end <= 1"),
        (dict(control_image=[np.zeros((8, 8, 3))] * 2), "a control image is 8x8, the output 16x16"),
        (dict(control_image=images, cache="deepcache:2"), "plain text-to-image or img2img"),
    ]
    for kwargs, match in cases:
        with pytest.raises(UserError, match=match):
            pipe(PROMPTS, steps=4, **kwargs)
    with pytest.raises(UserError, match="need a ControlNet"):
        load_pipeline(folder)(PROMPTS, steps=4, control_image=images[0])


def test_generate_with_a_controlnet(folders, tmp_path, capsys):
    from jaxdiff import cli
    from jaxdiff.images import save_png

    folder, net_folders = folders
    save_png(tmp_path / "edges.png", _images(1)[0][0])
    base = ["generate", "a b", "--model", str(folder), "--steps", "3", "--quiet", "--controlnet", str(net_folders[0])]
    out = tmp_path / "out"
    assert cli.main([*base, "--control-image", str(tmp_path / "edges.png"), "--out", str(out)]) == 0
    assert (out / "generate.json").is_file()
    for extra, message in [
        ([], "one --control-image per --controlnet (1), got 0"),
        (["--control-image", str(tmp_path / "edges.png"), "--control-window", "0.5"], "--control-window must be"),
    ]:
        assert cli.main([*base, *extra, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
