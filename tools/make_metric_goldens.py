"""Reference outputs of pytorch-fid 0.3.0, clean-fid, torch-fidelity and timm on seeded random weights, for the tests.

Runs in its own venv (the references need torchvision, which the pinned torch 2.13.0 CPU build lacks):

    python3.11 -m venv /tmp/goldvenv
    /tmp/goldvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid==0.3.0 clean-fid==0.1.35 \
        torch-fidelity==0.4.0 timm scipy numpy
    /tmp/goldvenv/bin/python tools/make_metric_goldens.py          # writes tests/goldens/fid_*.npz and timm_*.npz
    /tmp/goldvenv/bin/python tools/make_metric_goldens.py --only timm   # one section (fid, timm, features, lpips)
    /tmp/goldvenv/bin/pip install lpips==0.1.4   # for --only lpips (tests/goldens/lpips.npz)

Nothing is downloaded: each reference network gets weights drawn from a numpy seed (`inception_weights`, which the
tests import to draw the same weights), and only seeds, inputs and outputs are stored. Module level needs only numpy.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import tempfile
import zlib

import numpy as np

WEIGHTS_SEED = 20151205
INPUT_SEED = 6726825
IMAGES_SHAPE = (4, 64, 48, 3)  # N, H, W, C: not square, so a swapped height/width shows
SMALL_SHAPE = (1, 24, 20, 3)  # resize-only goldens: shrink and enlarge
SMALL_SIZES = {"down": (13, 11), "up": (37, 31)}  # (height, width)
SUBSAMPLE = 13  # preprocessed 299x299 inputs are stored every 13th pixel
MODES = ("pytorch-fid", "clean-fid", "torch-fidelity")
FRECHET_SHAPE = (120, 48)  # well-conditioned synthetic feature sets (N > D)
# timm's Inception-v4 / Inception-ResNet-v2 (both full size, 1000 classes) on 2 images of 107x91: not square, and the
# smallest height at which the last stage still has 2 rows (107 -> 53 -> 51 -> 25 -> 23 -> 11 -> 5 -> 2).
TIMM_MODELS = {"inception_v4": "InceptionV4", "inception_resnet_v2": "InceptionResnetV2"}
TIMM_SEED = 1602_07261  # arXiv:1602.07261, the paper of both networks
FEATURE_METRICS_SEED = 2020_0411  # KID / IS / PRDC on synthetic features
TIMM_INPUT_SHAPE = (2, 107, 91, 3)  # stored as uint8 images, fed as (x - 128) / 128: exact in float32
LPIPS_SEED = 1801_03924  # arXiv:1801.03924 (LPIPS)
LPIPS_NETS = ("vgg", "alex")
# image pairs per case: (N, H, W); not square, so a swapped height/width shows; 32x40 is near AlexNet's smallest input
LPIPS_CASES = {"64x48": (3, 64, 48), "32x40": (1, 32, 40)}


def inception_weights(shapes: dict[str, tuple[int, ...]], seed: int = WEIGHTS_SEED) -> dict[str, np.ndarray]:
    """float32 tensors for pytorch-fid's state-dict keys and shapes, each drawn from its own stream (seed, crc32 of
    the key) so the draw does not depend on key order. Scales keep activations O(1) through the 94 conv-BN-ReLU
    layers, with BN statistics far enough from (0, 1) that a mishandled BatchNorm shows."""
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            continue
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        if key.endswith("conv.weight"):
            fan_in = int(np.prod(shape[1:]))
            w = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif key == "fc.weight":
            w = rng.standard_normal(shape) / np.sqrt(shape[1])
        elif key.endswith("bn.weight") or key.endswith("running_var"):
            w = rng.uniform(0.5, 1.5, shape)
        elif key.endswith("running_mean"):
            w = rng.standard_normal(shape) * 0.2
        elif key.endswith("bias"):
            w = rng.standard_normal(shape) * 0.1
        else:
            raise KeyError(f"no rule to draw {key}")
        out[key] = w.astype(np.float32)
    return out


def timm_inception_weights(shapes: dict[str, tuple[int, ...]], seed: int = TIMM_SEED) -> dict[str, np.ndarray]:
    """float32 tensors for timm Inception-v4 / Inception-ResNet-v2 state-dict keys and shapes, each drawn from its
    own stream (seed, crc32 of the key): He-scaled ConvNormAct convolutions, 1/sqrt(fan-in) residual `conv2d`s (the
    un-normalised residual stream of Inception-ResNet grows less) and classifier, BN statistics away from (0, 1) so a
    mishandled BatchNorm shows."""
    out = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            continue
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        normal = rng.standard_normal(shape, dtype=np.float32)  # float32 draws: ~100M values, drawn in every test run
        if key.endswith("conv.weight"):
            w = normal * np.float32(np.sqrt(2.0 / int(np.prod(shape[1:]))))
        elif key.endswith(("conv2d.weight", "last_linear.weight", "classif.weight")):
            w = normal * np.float32(1.0 / np.sqrt(int(np.prod(shape[1:]))))
        elif key.endswith("bn.weight") or key.endswith("running_var"):
            w = np.float32(0.5) + rng.random(shape, dtype=np.float32)
        elif key.endswith("running_mean"):
            w = normal * np.float32(0.2)
        elif key.endswith("bias"):
            w = normal * np.float32(0.1)
        else:
            raise KeyError(f"no rule to draw {key}")
        out[key] = w
    return out


def timm_input(seed: int = TIMM_SEED) -> np.ndarray:
    """uint8 NHWC noise images [2, 107, 91, 3] (the network input is `timm_scale` of them)."""
    return np.random.default_rng([seed, 1]).integers(0, 256, TIMM_INPUT_SHAPE, dtype=np.uint8)


def timm_scale(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1) as (x - 128) / 128: every value exact, so both sides get identical inputs."""
    return (images.astype(np.float32) - 128.0) / 128.0


def lpips_weights(shapes: dict[str, tuple[int, ...]], seed: int = LPIPS_SEED) -> dict[str, np.ndarray]:
    """float32 tensors for lpips.LPIPS state-dict keys and shapes (the duplicate `lins.K.*` and the `scaling_layer.*`
    buffers skipped), each from its own stream (seed, crc32 of the key): He-scaled backbone convolutions, biases
    N(0, 0.1^2), lin weights U(0, 1) (non-negative, as the trained ones)."""
    out = {}
    for key, shape in shapes.items():
        if key.startswith(("lins.", "scaling_layer.")):
            continue
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        if key.startswith("lin"):
            w = rng.uniform(0.0, 1.0, shape)
        elif key.endswith("weight"):
            w = rng.standard_normal(shape) * np.sqrt(2.0 / int(np.prod(shape[1:])))
        elif key.endswith("bias"):
            w = rng.standard_normal(shape) * 0.1
        else:
            raise KeyError(f"no rule to draw {key}")
        out[key] = w.astype(np.float32)
    return out


def lpips_inputs(seed: int = LPIPS_SEED) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{case: (in0, in1)} float32 NHWC in [-1, 1]: in0 uniform noise; in1 a perturbation of in0 (pair 0: small,
    pair 1: large), the third pair independent noise."""
    out = {}
    for i, (case, (n, h, w)) in enumerate(LPIPS_CASES.items()):
        rng = np.random.default_rng([seed, i])
        a = rng.uniform(-1.0, 1.0, (n, h, w, 3))
        noise = rng.standard_normal((n, h, w, 3)) * np.array([0.05, 0.5, 0.0])[:n, None, None, None]
        b = np.clip(a + noise, -1.0, 1.0)
        if n > 2:
            b[2] = rng.uniform(-1.0, 1.0, (h, w, 3))
        out[case] = (a.astype(np.float32), b.astype(np.float32))
    return out


def weights_checksum(weights: dict[str, np.ndarray]) -> float:
    """A float64 fingerprint of drawn weights (tells a changed numpy stream from a wrong model)."""
    return float(sum(np.float64(np.abs(v).sum()) * (1 + i % 7) for i, (_, v) in enumerate(sorted(weights.items()))))


def test_images(seed: int = INPUT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(images [4, 64, 48, 3], small [1, 24, 20, 3]) uint8 noise: full-range, so bicubic overshoot gets clipped."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, IMAGES_SHAPE, dtype=np.uint8), rng.integers(0, 256, SMALL_SHAPE, dtype=np.uint8)


def frechet_features(seed: int = INPUT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Two correlated Gaussian feature sets [120, 48] float32 with different means and covariances."""
    rng = np.random.default_rng([seed, 1])
    n, d = FRECHET_SHAPE
    a = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + 1.0
    b = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.25 + rng.uniform(0.5, 1.5, d)
    return a.astype(np.float32), b.astype(np.float32)


# ------------------------------------------------------------------ references (torch imported from here on)


def _nchw(images):
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


def _nhwc(t) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy().astype(np.float32)


def _pytorch_fid_networks(state):
    """pytorch-fid's InceptionV3 wrapper (blocks 0-3, resize and [-1, 1] inside) and its bare fid_inception_v3 (for
    the logits), both loading `state` where they would download the weights."""
    import pytorch_fid.inception as pfi

    pfi.load_state_dict_from_url = lambda *a, **k: {k_: v.clone() for k_, v in state.items()}
    blocks = pfi.InceptionV3([0, 1, 2, 3], resize_input=True, normalize_input=True).eval()
    bare = pfi.fid_inception_v3().eval()
    return blocks, bare


def _state_dict_shapes():
    import pytorch_fid.inception as pfi

    pfi.load_state_dict_from_url = lambda *a, **k: None
    net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in (("Mixed_5b", pfi.FIDInceptionA(192, 32)), ("Mixed_5c", pfi.FIDInceptionA(256, 64)),
                        ("Mixed_5d", pfi.FIDInceptionA(288, 64)), ("Mixed_6b", pfi.FIDInceptionC(768, 128)),
                        ("Mixed_6c", pfi.FIDInceptionC(768, 160)), ("Mixed_6d", pfi.FIDInceptionC(768, 160)),
                        ("Mixed_6e", pfi.FIDInceptionC(768, 192)), ("Mixed_7b", pfi.FIDInceptionE_1(1280)),
                        ("Mixed_7c", pfi.FIDInceptionE_2(2048))):  # fmt: skip
        setattr(net, name, block)
    sd = net.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    n_params = sum(p.numel() for p in net.parameters())
    return shapes, n_params


def _run_network(blocks, bare, x_pre):
    """Features of already-preprocessed NCHW [-1, 1] 299x299 inputs through pytorch-fid's network."""
    import torch

    with torch.no_grad():
        outs = blocks.blocks
        feats, x = {}, x_pre
        for i, block in enumerate(outs):
            x = block(x)
            if i < 3:
                feats[f"block{i}"] = x.mean(dim=(2, 3)).numpy()
        feats["pool3"] = x[:, :, 0, 0].numpy()
        feats["logits"] = bare(x_pre).numpy()
    return feats


def references(out_dir: str) -> None:
    import cleanfid
    import cleanfid.fid
    import cleanfid.resize
    import pytorch_fid
    import pytorch_fid.fid_score as pfs
    import torch
    import torch.nn.functional as F
    import torch_fidelity
    import torch_fidelity.metric_fid as tfm
    from PIL import Image
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x as tf1_resize

    torch.set_num_threads(2)
    shapes, n_params = _state_dict_shapes()
    weights = inception_weights(shapes)
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    blocks, bare = _pytorch_fid_networks(state)
    images, small = test_images()
    x = _nchw(images)
    g: dict[str, np.ndarray] = {}

    # pytorch-fid: ToTensor (/255), bilinear to 299 (align_corners=False), 2x - 1 -- all inside its InceptionV3.
    x01 = x.float() / 255
    pre = {"pytorch-fid": 2 * F.interpolate(x01, size=(299, 299), mode="bilinear", align_corners=False) - 1}
    with torch.no_grad():
        wrapped = [o[:, :, 0, 0].numpy() for o in blocks(x01)]
    # clean-fid "clean": PIL bicubic per channel on float, clip to [0, 255], then (x - 128) / 128 (its InceptionV3W).
    resize_clean = cleanfid.resize.build_resizer("clean")
    clean = np.stack([resize_clean(im) for im in images])
    pre["clean-fid"] = (_nchw(clean) - 128) / 128
    # torch-fidelity: TF1-compatible bilinear on float uint8 values, then (x - 128) / 128.
    pre["torch-fidelity"] = (tf1_resize(x.float(), size=(299, 299), align_corners=False) - 128) / 128

    for mode in MODES:
        feats = _run_network(blocks, bare, pre[mode])
        for name, value in feats.items():
            if mode == "pytorch-fid" or name in ("block0", "pool3", "logits"):  # the file stays small
                g[f"{mode}/{name}"] = value.astype(np.float32)
        g[f"{mode}/preprocessed_sub"] = _nhwc(pre[mode])[:, ::SUBSAMPLE, ::SUBSAMPLE, :]
    # pytorch-fid's own wrapper must agree with the block-by-block run (same program, fed [0, 1] images).
    np.testing.assert_allclose(wrapped[3], g["pytorch-fid/pool3"], rtol=0, atol=1e-6)

    # torch-fidelity's own extractor, its weights file written from the same tensors.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "weights-inception-2015-12-05-6726825d.pth")
        torch.save(state, path)
        fx = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=path).eval()  # fmt: skip
        with torch.no_grad():
            pool3, unbiased = (t.numpy() for t in fx(x))
    # its network is pytorch-fid's (same blocks, same quirks): pool3 equal to the block-by-block run, stored once
    np.testing.assert_allclose(pool3, g["torch-fidelity/pool3"], rtol=0, atol=1e-6)
    g["torch-fidelity/own_logits_unbiased"] = unbiased

    # Resize-only goldens at small sizes (shrinking and enlarging), each reference's own function.
    xs = _nchw(small)
    for tag, (h, w) in SMALL_SIZES.items():
        g[f"resize/{tag}/pytorch-fid"] = _nhwc(F.interpolate(xs.float() / 255, size=(h, w), mode="bilinear",
                                                             align_corners=False))  # fmt: skip
        g[f"resize/{tag}/torch-fidelity"] = _nhwc(tf1_resize(xs.float(), size=(h, w), align_corners=False))
        pil = cleanfid.resize.make_resizer("PIL", False, "bicubic", (w, h))  # PIL sizes are (width, height)
        g[f"resize/{tag}/clean-fid"] = pil(small[0])[None]

    # pytorch-fid end to end on PNG files, and its statistics file (dims=64 keeps it small).
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        for i, im in enumerate(images):
            Image.fromarray(im).save(os.path.join(folder, f"{i}.png"))
        stats_path = os.path.join(out_dir, "fid_pytorch_fid_stats_dims64.npz")
        if os.path.exists(stats_path):
            os.remove(stats_path)
        pfs.save_fid_stats([folder, stats_path], batch_size=3, device="cpu", dims=64, num_workers=0)
        model = pfs.InceptionV3([3])
        act = pfs.get_activations(sorted(os.path.join(folder, f) for f in os.listdir(folder)), model, 3, 2048, "cpu", 0)
    np.testing.assert_allclose(act, g["pytorch-fid/pool3"], rtol=0, atol=1e-6)  # files == in-memory arrays

    # Fréchet distances by each reference's own function.
    def stats(a):
        a = np.asarray(a, np.float64)
        return np.mean(a, axis=0), np.cov(a, rowvar=False)

    fa, fb = frechet_features()
    g["frechet/a"], g["frechet/b"] = fa, fb
    # block0 (64-d) of 4 images: singular covariances (pytorch-fid's eps retry), small enough for a fast test.
    pairs = {"synthetic": (fa, fb), "singular": (g["pytorch-fid/block0"], g["clean-fid/block0"])}
    for tag, (a, b) in pairs.items():
        (m1, s1), (m2, s2) = stats(a), stats(b)
        g[f"frechet/{tag}/pytorch-fid"] = np.float64(pfs.calculate_frechet_distance(m1, s1, m2, s2))
        g[f"frechet/{tag}/clean-fid"] = np.float64(cleanfid.fid.frechet_distance(m1, s1, m2, s2))
        tf_value = tfm.fid_statistics_to_metric({"mu": m1, "sigma": s1}, {"mu": m2, "sigma": s2}, False)
        g[f"frechet/{tag}/torch-fidelity"] = np.float64(tf_value[tfm.KEY_METRIC_FID])

    g["state_keys"] = np.array(sorted(shapes))
    g["state_shapes"] = np.array(json.dumps({k: list(v) for k, v in sorted(shapes.items())}))
    g["torch_num_params"] = np.int64(n_params)
    g["weights_checksum"] = np.float64(weights_checksum(weights))
    g["weights_seed"], g["input_seed"] = np.int64(WEIGHTS_SEED), np.int64(INPUT_SEED)
    g["images"], g["small_images"] = images, small
    versions = {
        "pytorch-fid": pytorch_fid.__version__,
        "clean-fid": importlib.metadata.version("clean-fid"),
        "torch-fidelity": torch_fidelity.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    g["versions"] = np.array(json.dumps(versions))
    path = os.path.join(out_dir, "fid_inception.npz")
    np.savez_compressed(path, **g)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB) and {stats_path}; {versions}")
    for tag in pairs:
        print(tag, {m: float(g[f"frechet/{tag}/{m}"]) for m in MODES})


def timm_references(out_dir: str) -> None:
    """timm's inception_v4 and inception_resnet_v2 (eval mode) on drawn weights: features and logits of one input."""
    import timm
    import torch

    torch.set_num_threads(2)
    images = timm_input()
    x = timm_scale(images)
    for name in TIMM_MODELS:
        net = timm.create_model(name, pretrained=False, num_classes=1000).eval()
        shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        weights = timm_inception_weights(shapes)
        missing, unexpected = net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
        assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
        with torch.no_grad():
            feats = net.forward_features(_nchw(x))
            pooled = net.forward_head(feats, pre_logits=True).numpy()
            logits = net(_nchw(x)).numpy()
        g = {
            "features": pooled.astype(np.float32),
            "logits": logits.astype(np.float32),
            "images": images,
            "weights_seed": np.int64(TIMM_SEED),
            "weights_checksum": np.float64(weights_checksum(weights)),
            "state_shapes": np.array(json.dumps({k: list(v) for k, v in sorted(shapes.items())})),
            "torch_num_params": np.int64(sum(p.numel() for p in net.parameters())),
            "versions": np.array(json.dumps({"timm": timm.__version__, "torch": torch.__version__})),
        }
        path = os.path.join(out_dir, f"timm_{name}.npz")
        np.savez_compressed(path, **g)
        print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB): {int(g['torch_num_params']):,} parameters, "
              f"max |features| {np.abs(pooled).max():.3g}, max |logits| {np.abs(logits).max():.3g}")  # fmt: skip


def feature_metric_inputs(seed: int = FEATURE_METRICS_SEED) -> dict[str, np.ndarray]:
    """Synthetic feature sets (real, fake shifted off it) and class logits for KID, IS and PRDC (float32)."""
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(200, 32)).astype(np.float32)
    fake = (rng.normal(size=(180, 32)) * 1.2 + 0.3).astype(np.float32)
    logits = (rng.normal(size=(150, 10)) * 3.0).astype(np.float32)
    return {"real": real, "fake": fake, "logits": logits}


def feature_metric_references(out_dir: str) -> None:
    """KID and IS by torch-fidelity's own functions, PRDC by the `prdc` package (Naeem et al.), on fixed features."""
    import prdc
    import torch
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    x = feature_metric_inputs()
    g = {f"input/{k}": v for k, v in x.items()}
    real, fake = torch.from_numpy(x["real"]), torch.from_numpy(x["fake"])
    kid = kid_features_to_metric(real, fake, kid_subsets=20, kid_subset_size=100, verbose=False)
    g["kid/mean"], g["kid/std"] = (
        np.float64(kid["kernel_inception_distance_mean"]),
        np.float64(kid["kernel_inception_distance_std"]),
    )
    isc = isc_features_to_metric(torch.from_numpy(x["logits"]), splits=5)
    g["is/mean"], g["is/std"] = np.float64(isc["inception_score_mean"]), np.float64(isc["inception_score_std"])
    for k in (3, 5):
        for name, value in prdc.compute_prdc(x["real"], x["fake"], nearest_k=k).items():
            g[f"prdc/k{k}/{name}"] = np.float64(value)
    import torch_fidelity

    g["versions"] = np.array(json.dumps({"torch-fidelity": torch_fidelity.__version__,
                                         "prdc": importlib.metadata.version("prdc")}))  # fmt: skip
    np.savez(os.path.join(out_dir, "feature_metrics.npz"), **g)
    print({k: float(v) for k, v in g.items() if not k.startswith(("input/", "versions"))})


def lpips_references(out_dir: str) -> None:
    """lpips.LPIPS(net, version="0.1") forward(in0, in1, retPerLayer=True, normalize=False) on drawn weights (built with
    pretrained=False, pnet_rand=True: nothing downloaded), for each net and case of `lpips_inputs`."""
    import lpips
    import torch

    torch.set_num_threads(2)
    g: dict[str, np.ndarray] = {}
    inputs = lpips_inputs()
    for net in LPIPS_NETS:
        torch.manual_seed(0)
        model = lpips.LPIPS(net=net, version="0.1", pretrained=False, pnet_rand=True, verbose=False).eval()
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        weights = lpips_weights(shapes)
        missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
        assert not unexpected and all(k.startswith(("lins.", "scaling_layer.")) for k in missing), (missing, unexpected)
        for kk in range(5):  # linK and lins[K] are one module
            assert torch.equal(model.lins[kk].model[1].weight, torch.from_numpy(weights[f"lin{kk}.model.1.weight"]))
        for case, (a, b) in inputs.items():
            with torch.no_grad():
                value, layers = model(_nchw(a), _nchw(b), retPerLayer=True, normalize=False)
            g[f"{net}/{case}"] = value.reshape(-1).numpy().astype(np.float32)
            g[f"{net}/{case}/layers"] = torch.stack([x.reshape(-1) for x in layers], 1).numpy().astype(np.float32)
        g[f"{net}/state_shapes"] = np.array(json.dumps({k: list(v) for k, v in shapes.items()}))
        g[f"{net}/weights_checksum"] = np.float64(weights_checksum(weights))
    g["seed"] = np.int64(LPIPS_SEED)
    g["cases"] = np.array(json.dumps(LPIPS_CASES))
    versions = {"lpips": importlib.metadata.version("lpips"), "torch": torch.__version__, "numpy": np.__version__}
    g["versions"] = np.array(json.dumps(versions))
    path = os.path.join(out_dir, "lpips.npz")
    np.savez_compressed(path, **g)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB); {versions}")
    print({k: v.tolist() for k, v in g.items() if k.count("/") == 1 and k.split("/")[1] in LPIPS_CASES})


SECTIONS = {
    "fid": references,
    "timm": timm_references,
    "features": feature_metric_references,
    "lpips": lpips_references,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "goldens"))
    p.add_argument("--only", choices=sorted(SECTIONS), action="append", help="write only this section (repeatable)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for name in args.only or SECTIONS:
        SECTIONS[name](os.path.abspath(args.out))


if __name__ == "__main__":
    main()
