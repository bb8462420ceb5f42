"""`jaxdiff evaluate`: Fréchet distance on the shapes probe's features with a bootstrap interval, from folders,
statistics files or a model's samples; bad input is one line and exit 2."""

import json

import numpy as np
import pytest
from PIL import Image

from jaxdiff import cli
from jaxdiff.data.shapes_tfds import make_example
from jaxdiff.metrics import evaluate as ev
from jaxdiff.metrics import frechet


def _folder(path, images):
    path.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(path / f"{i:04d}.png")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    real = _folder(root / "real", [make_example("test", i, 32)["image"] for i in range(48)])
    same = _folder(root / "same", [make_example("validation", i, 32)["image"] for i in range(48)])
    rng = np.random.default_rng(0)
    noise = _folder(root / "noise", [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(48)])
    return root, real, same, noise


def _evaluate(capsys, *args):
    rc = cli.main(["evaluate", "fd-probe", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_renders_are_close_and_noise_is_far_with_intervals_and_counts(folders, capsys):
    root, real, same, noise = folders
    rc, out, _ = _evaluate(capsys, "--real", real, "--fake", same, "--bootstrap", 20, "--out", root / "same.json")
    assert rc == 0
    close = json.loads((root / "same.json").read_text())
    assert close == json.loads(out)
    rc, out, _ = _evaluate(capsys, "--real", real, "--fake", noise, "--bootstrap", 20)
    far = json.loads(out)
    assert close["n_real"] == close["n_fake"] == 48 and close["bootstrap"] == 20
    assert far["value"] > 3 * close["value"], (close["value"], far["value"])  # 48 images: FD is biased upwards
    for record in (close, far):
        lo, hi = record["interval95"]
        assert lo <= record["value"] <= hi  # centred on the value (resampling alone raises FD)


def test_the_value_is_the_frechet_distance_of_the_probe_features(folders, capsys):
    _, real, same, _ = folders
    rc, out, _ = _evaluate(capsys, "--real", real, "--fake", same, "--bootstrap", 0)
    expected = frechet.frechet_distance_from_features(
        ev.probe_features(ev.read_images(real)), ev.probe_features(ev.read_images(same))
    )
    record = json.loads(out)
    assert rc == 0 and record["interval95"] is None
    assert record["value"] == pytest.approx(expected, rel=1e-9)


def test_saved_statistics_read_back_give_the_same_value(folders, capsys, tmp_path):
    _, real, same, _ = folders
    stats = tmp_path / "real.npz"
    _, out1, _ = _evaluate(capsys, "--real", real, "--fake", same, "--bootstrap", 0, "--save-stats", stats)
    _, out2, _ = _evaluate(capsys, "--real", stats, "--fake", same, "--bootstrap", 0)
    with np.load(stats) as z:
        assert set(z.files) >= {"mu", "sigma"}  # pytorch-fid's layout
    assert json.loads(out2)["value"] == pytest.approx(json.loads(out1)["value"], rel=1e-12)
    assert json.loads(out2)["n_real"] == 48


def test_samples_of_a_model_from_a_prompt_file(folders, capsys, tmp_path):
    _, real, _, _ = folders
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    rc, out, _ = _evaluate(
        capsys, "--real", real, "--model", "shapes", "--prompts", prompts, "--num-images", 2, "--steps", 4
    )
    record = json.loads(out)
    assert (
        rc == 0 and record["n_fake"] == 4
    )  # 2 prompts x 2 seeds and "shapes" in record["fake"] and np.isfinite(record["value"])


def test_bad_input_is_one_line_and_exit_2(folders, capsys, tmp_path):
    _, real, same, _ = folders
    mixed = _folder(tmp_path / "mixed", [np.zeros((32, 32, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)])
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, mu=np.zeros(3), sigma=np.eye(3))
    one = _folder(tmp_path / "one", [np.zeros((32, 32, 3), np.uint8)])
    cases = [
        (("--real", real, "--fake", mixed), "mixes image sizes"),
        (("--real", wrong, "--fake", same), "dimension 3"),
        (("--real", real, "--fake", one), "at least 2"),
        (("--real", real, "--fake", tmp_path / "none"), "not a folder"),
        (("--real", real), "exactly one of --fake"),
    ]
    for args, message in cases:
        rc, _, err = _evaluate(capsys, *args)
        assert rc == 2 and message in err and err.count("\n") == 1, (args, err)


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    """A random-weight FID Inception saved as a jaxdiff folder (the network's parity is tests/test_fid_inception);
    weights drawn in numpy, no compiled init."""
    import fid_worker

    from jaxdiff.convert import checkpoint

    model = fid_worker.model()
    folder = tmp_path_factory.mktemp("inception") / "inception"
    checkpoint.save_checkpoint(folder, model)
    return model, folder


def test_fid_with_a_converted_inception_equals_the_library_s_fid(folders, inception, capsys, tmp_path):
    """`evaluate fid` = fid.fid of fid.statistics on the same features."""
    from jaxdiff.metrics import fid

    model, folder = inception
    real = ev.read_images(folders[1])[:6]
    fake = ev.read_images(folders[2])[:6]
    r, f = _folder(tmp_path / "r", list(real)), _folder(tmp_path / "f", list(fake))
    args = ("--real", r, "--fake", f, "--inception", folder, "--batch-size", 6, "--bootstrap", 0)
    rc = cli.main(["evaluate", "fid", *map(str, args)])
    record = json.loads(capsys.readouterr().out)
    mesh = ev._mesh()  # the command's: the same compiled program (8 devices = 1 is tests/test_fid_inception)
    expected = fid.fid(*(fid.statistics(x, params=model, batch_size=6, mesh=mesh) for x in (real, fake)))
    assert rc == 0 and record["mode"] == "pytorch-fid" and record["feature_dim"] == 2048
    assert record["value"] == pytest.approx(expected, rel=1e-6)
    rc, _, err = _evaluate_metric(capsys, "fid", "--real", r, "--fake", f)
    assert rc == 2 and "--inception" in err


def _evaluate_metric(capsys, metric, *args):
    rc = cli.main(["evaluate", metric, *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """24 renders with their captions, and the same captions shifted by one (mostly wrong for each image)."""
    root = tmp_path_factory.mktemp("captioned")
    examples = [make_example("test", i, 32) for i in range(24)]
    images = _folder(root / "images", [e["image"] for e in examples])
    right, wrong = root / "right.txt", root / "wrong.txt"
    captions = [e["caption"] for e in examples]
    right.write_text("\n".join(captions) + "\n")
    wrong.write_text("\n".join(captions[1:] + captions[:1]) + "\n")
    return images, right, wrong, captions


def test_kid_and_prdc_on_probe_features_are_the_library_s_values(folders, capsys):
    from jaxdiff.metrics import kid, prdc

    _, real, same, noise = folders
    f_real, f_same = ev.probe_features(ev.read_images(real)), ev.probe_features(ev.read_images(same))
    args = ("--features", "probe", "--real", real, "--fake", same)
    rc, out, _ = _evaluate_metric(capsys, "kid", *args, "--kid-subsets", 10)
    record = json.loads(out)
    expected = kid.kid(f_real, f_same, subsets=10, subset_size=48)
    assert rc == 0 and record["kid_subset_size"] == 48 and record["n_real"] == record["n_fake"] == 48
    assert record["value"] == pytest.approx(expected.mean, rel=1e-9) and record["std"] == pytest.approx(expected.std)
    rc, out, _ = _evaluate_metric(capsys, "prdc", *args, "--bootstrap", 5)
    record = json.loads(out)
    assert rc == 0 and record["value"] == prdc.prdc(f_real, f_same)
    assert set(record["interval95"]) == {"precision", "recall", "density", "coverage"}
    _, out, _ = _evaluate_metric(capsys, "prdc", "--features", "probe", "--real", real, "--fake", noise)
    assert json.loads(out)["value"]["recall"] < record["value"]["recall"] / 2  # noise sits in one clump: no recall


def test_shapes_clip_score_prefers_the_right_captions_and_equals_100_cos(captioned, capsys):
    from jaxdiff.metrics.shapes_clip import load_shapes_clip

    images, right, wrong, captions = captioned
    rc, out, _ = _evaluate_metric(capsys, "clip-score", "--clip", "shapes", "--fake", images, "--prompts", right)
    good = json.loads(out)
    _, out, _ = _evaluate_metric(capsys, "clip-score", "--clip", "shapes", "--fake", images, "--prompts", wrong)
    bad = json.loads(out)
    clip = load_shapes_clip()
    a, b = clip.image_embeds(ev.read_images(images)), clip.text_embeds(captions)
    cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert rc == 0 and good["n_fake"] == 24 and good["n_real"] is None
    assert good["value"] == pytest.approx(100 * cos.mean(), rel=1e-5)
    assert good["value"] > bad["value"] and good["interval95"][0] <= good["value"] <= good["interval95"][1]


def test_cmmd_on_shapes_clip_is_small_for_renders_and_large_for_noise(folders, capsys):
    _, real, same, noise = folders
    base = ("--clip", "shapes", "--real", real, "--bootstrap", 0)
    close = json.loads(_evaluate_metric(capsys, "cmmd", *base, "--fake", same)[1])
    far = json.loads(_evaluate_metric(capsys, "cmmd", *base, "--fake", noise)[1])
    assert 0 <= close["value"] < far["value"] / 3, (close["value"], far["value"])


def test_bad_input_for_the_other_metrics_is_one_line_and_exit_2(folders, captioned, capsys, tmp_path):
    _, real, same, _ = folders
    images, right, _, _ = captioned
    stats = tmp_path / "s.npz"
    np.savez(stats, mu=np.zeros(3), sigma=np.eye(3))
    two = tmp_path / "two.txt"
    two.write_text("a red circle\na blue square\n")
    cases = [
        (("kid", "--features", "probe", "--real", stats, "--fake", same), "not statistics"),
        (("clip-score", "--clip", "shapes", "--fake", images), "needs --prompts"),
        (("clip-score", "--clip", "shapes", "--fake", images, "--prompts", two), "one prompt per image"),
        (("cmmd", "--real", real, "--fake", same), "needs a CLIP model"),
        (("cmmd", "--clip", tmp_path / "nothing", "--real", real, "--fake", same), "--clip"),
        (("is", "--fake", same), "--inception"),
        (("is", "--fake", same, "--inception", tmp_path / "missing.pth"), "no Inception weights"),
        (("fid", "--real", real, "--fake", same, "--inception", two), "unknown weights format"),
    ]
    for args, message in cases:
        rc, _, err = _evaluate_metric(capsys, *args)
        assert rc == 2 and message in err and err.count("\n") == 1, (args, err)


def test_inception_score_of_the_command_is_the_library_s(folders, inception, capsys, tmp_path):
    from jaxdiff.metrics import fid
    from jaxdiff.metrics.inception_score import inception_score

    model, folder = inception
    fake = ev.read_images(folders[2])[:6]
    args = ("--fake", _folder(tmp_path / "f", list(fake)), "--inception", folder, "--splits", 2, "--batch-size", 6)
    rc, out, _ = _evaluate_metric(capsys, "is", *args, "--mode", "torch-fidelity")
    record = json.loads(out)
    logits = fid.features(fake, "torch-fidelity", model, batch_size=6, output="logits_unbiased", mesh=ev._mesh())
    expected = inception_score(logits, splits=2)
    assert rc == 0 and record["n_fake"] == 6 and record["splits"] == 2 and record["mode"] == "torch-fidelity"
    assert record["value"] == pytest.approx(expected.mean, rel=1e-5)
    assert record["std"] == pytest.approx(expected.std, rel=1e-4, abs=1e-6)
