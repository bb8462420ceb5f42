"""CopyScope: exact and sampled Shapley values on hand-computed games, weight deltas of components, and the
attribution of two components of the shapes model end to end (cached images, the value = probe FD)."""

import argparse
import dataclasses
import itertools
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from jaxdiff.errors import UserError
from jaxdiff.metrics import copyscope as cs

# ------------------------------------------------------------------------------------------------ game theory


def _table_game(values: dict):
    table = {frozenset(k): float(x) for k, x in values.items()}
    return lambda s: table[frozenset(s)]


def test_two_player_game_by_hand():
    v = _table_game({(): 0.0, (0,): 1.0, (1,): 2.0, (0, 1): 5.0})
    # φ0 = ½ (v0 − v∅) + ½ (v01 − v1) = ½ + 3/2; φ1 = ½ · 2 + ½ · 4
    np.testing.assert_allclose(cs.shapley_exact(v, 2), [2.0, 3.0])
    np.testing.assert_allclose(cs.leave_one_out(v, 2), [3.0, 4.0])
    np.testing.assert_allclose(cs.normalised([2.0, -3.0]), [-0.4, 0.6])
    np.testing.assert_array_equal(cs.normalised([0.0, 0.0]), [0.0, 0.0])


def test_additive_game_gives_each_player_its_weight_exactly_and_by_sampling():
    w = np.array([3.0, -1.5, 0.0, 7.25])
    v = lambda s: float(sum(w[i] for i in s))  # noqa: E731
    np.testing.assert_allclose(cs.shapley_exact(v, 4), w, atol=1e-12)
    phi, se = cs.shapley_permutations(v, 4, num_permutations=5, seed=1)
    np.testing.assert_allclose(phi, w, atol=1e-12)
    np.testing.assert_allclose(se, 0.0, atol=1e-12)  # every order gives each player its weight


def test_glove_game_symmetric_players_share_and_a_null_player_gets_nothing():
    # player 0 holds a left glove, 1 and 2 right gloves, 3 nothing: a pair is worth 1.
    v = lambda s: float(0 in s and (1 in s or 2 in s))  # noqa: E731
    np.testing.assert_allclose(cs.shapley_exact(v, 4), [2 / 3, 1 / 6, 1 / 6, 0.0], atol=1e-12)


def test_symmetric_game_splits_the_grand_value_equally():
    v = lambda s: len(s) ** 2  # noqa: E731
    np.testing.assert_allclose(cs.shapley_exact(v, 5), [5.0] * 5)  # 25 / 5


def _random_game(n, seed):
    rng = np.random.default_rng(seed)
    table = {s: float(rng.normal()) for s in cs.all_coalitions(n)}
    return lambda s: table[frozenset(s)]


def test_exact_is_efficient_and_matches_the_permutation_definition():
    v = _random_game(4, 0)
    phi = cs.shapley_exact(v, 4)
    assert phi.sum() == pytest.approx(v(frozenset(range(4))) - v(frozenset()), abs=1e-12)
    by_orders = np.zeros(4)  # the average marginal contribution over all 4! orders
    for order in itertools.permutations(range(4)):
        for k, i in enumerate(order):
            by_orders[i] += v(frozenset(order[: k + 1])) - v(frozenset(order[:k]))
    np.testing.assert_allclose(phi, by_orders / math.factorial(4), atol=1e-12)


def test_permutation_estimate_is_within_its_standard_error_of_exact_on_a_random_six_player_game():
    v = _random_game(6, 3)
    exact = cs.shapley_exact(v, 6)
    phi, se = cs.shapley_permutations(v, 6, num_permutations=800, seed=0)
    assert np.all(se > 0)
    assert np.all(np.abs(phi - exact) <= 4 * se), (phi - exact) / se
    assert phi.sum() == pytest.approx(v(frozenset(range(6))) - v(frozenset()), abs=1e-9)  # efficient per order
    _, se_small = cs.shapley_permutations(v, 6, num_permutations=50, seed=0)
    assert np.mean(se_small) > 2.5 * np.mean(se)  # ~ 1/√K: 4x at 16x the orders


def test_sampling_visits_only_prefixes_and_calls_each_coalition_once():
    perms = cs.sample_permutations(5, 3, seed=2)
    assert sorted(perms[0].tolist()) == list(range(5))
    visited = cs.permutation_coalitions(perms)
    expected = {frozenset(p[:k].tolist()) for p in perms for k in range(6)}
    assert set(visited) == expected and len(visited) == len(expected)
    calls = []
    cs.shapley_permutations(lambda s: calls.append(s) or len(s), 5, 3, seed=2)
    assert sorted(calls, key=sorted) == sorted(set(calls), key=sorted) and set(calls) == expected


def test_exact_is_refused_beyond_the_limit_with_a_hint():
    names = [f"c{i}" for i in range(cs.MAX_EXACT_PLAYERS + 1)]
    with pytest.raises(UserError, match="--permutations"):
        cs._check_players(names, 0)
    cs._check_players(names, 10)  # sampling is fine
    with pytest.raises(UserError, match="NAME=PATH"):
        cs.parse_components(["no_equals_sign"])
    with pytest.raises(UserError, match="twice"):
        cs.parse_components(["a=x", "a=y"])


# ------------------------------------------------------------------------------------------------ components


def test_weight_delta_keeps_changed_leaves_and_names_misshaped_ones():
    base = {"a/kernel": np.ones((2, 3)), "b/bias": np.zeros(3)}
    same = cs.weight_delta("c", base, {"a/kernel": np.ones((2, 3)), "b/bias": np.array([0.0, 0.5, 0.0])})
    assert list(same) == ["b/bias"] and same["b/bias"][1] == 0.5
    with pytest.raises(UserError, match=r"a/kernel \(3, 3\) vs base \(2, 3\)") as e:
        cs.weight_delta("component x", base, {"a/kernel": np.ones((3, 3)), "b/bias": np.zeros(3)})
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="leaves missing: b/bias"):
        cs.weight_delta("component x", base, {"a/kernel": np.ones((2, 3))})


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The shapes pipeline, a model component (one UNet kernel perturbed), an SPM adapter component, 8 reference
    renders and 2 prompts."""
    from jaxdiff.convert import checkpoint
    from jaxdiff.convert.safetensors_io import write_safetensors
    from jaxdiff.data import shapes as S
    from jaxdiff.sampling.pipeline import load_pipeline, resolve

    root = tmp_path_factory.mktemp("copyscope")
    pipe = load_pipeline("shapes")
    cs._PIPELINES[str(resolve("shapes").resolve())] = pipe  # the runs below reuse its compiled sampler
    flat = traverse_util.flatten_dict(pipe.unet.params, sep="/")
    kv = sorted(k for k in flat if "attn2/to_k/kernel" in k)
    rng = np.random.default_rng(0)
    edited = dict(flat)
    edited[kv[0]] = flat[kv[0]] + jnp.asarray(rng.normal(0, 0.5, flat[kv[0]].shape), jnp.float32)
    unet = dataclasses.replace(pipe.unet, params=traverse_util.unflatten_dict(edited, sep="/"))
    models = {"unet": unet, "vae": pipe.vae, "text_encoder": pipe.text_encoders[0]}
    checkpoint.save_pipeline(pipe.path, root / "edit" / "model", models)  # an erase-output-like folder
    module = kv[-1].rsplit("/", 1)[0].replace("to_k", "to_v")
    down = rng.normal(0, 0.3, (*flat[f"{module}/kernel"].shape[:-1], 2)).astype(np.float32)
    up = rng.normal(0, 0.3, (2, flat[f"{module}/kernel"].shape[-1])).astype(np.float32)
    (root / "spm").mkdir()
    write_safetensors(root / "spm" / "adapters.safetensors", {f"{module}/down": down, f"{module}/up": up})
    (root / "spm" / "spm.json").write_text(json.dumps({"rank": 2, "alpha": 1.0}))
    ref = root / "ref"
    ref.mkdir()
    scenes = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(S.render(S.sample_scene(scenes, num_objects=1))).save(ref / f"{i}.png")
    (root / "prompts.txt").write_text("a red circle\na blue square\n")
    expected = {kv[0]: np.asarray(edited[kv[0]] - flat[kv[0]]), f"{module}/kernel": 0.5 * down @ up}
    return root, pipe, expected


def _args(root, *extra):
    parser = argparse.ArgumentParser()
    cs.add_arguments(parser)
    argv = ["--components", f"edit={root / 'edit'}", f"spm={root / 'spm'}", "--reference", str(root / "ref")]
    argv += ["--prompts", str(root / "prompts.txt"), "--num-images", "2", "--steps", "2", "--cache", str(root / "c")]
    return parser.parse_args([*argv, "--quiet", *map(str, extra)])


def test_components_are_weight_deltas_and_a_coalition_adds_them(world):
    root, pipe, expected = world
    base = cs.flat_params(pipe)
    edit = cs.load_component("edit", root / "edit", pipe, base)  # OUT/model found inside the output folder
    spm = cs.load_component("spm", root / "spm", pipe, base)
    (leaf_e,) = edit.deltas["unet"]
    (leaf_s,) = spm.deltas["unet"]
    assert set(edit.deltas) == {"unet"} and spm.kind == "spm-adapter"
    np.testing.assert_allclose(edit.deltas["unet"][leaf_e], expected[leaf_e], atol=1e-6)
    np.testing.assert_allclose(spm.deltas["unet"][leaf_s], expected[leaf_s], rtol=1e-5, atol=1e-6)
    both = traverse_util.flatten_dict(cs.coalition_params(pipe, base, [edit, spm])["unet"], sep="/")
    for leaf in (leaf_e, leaf_s):
        np.testing.assert_allclose(both[leaf], np.asarray(base["unet"][leaf]) + expected[leaf], rtol=1e-5, atol=1e-6)
    untouched = next(k for k in base["unet"] if k not in (leaf_e, leaf_s))
    assert both[untouched] is base["unet"][untouched]
    assert edit.digest() != spm.digest() and edit.digest() == cs.load_component("e2", root / "edit", pipe).digest()


def test_attribution_end_to_end_cached_and_consistent(world, capsys, monkeypatch):
    from jaxdiff.metrics import evaluate as ev
    from jaxdiff.metrics import frechet
    from jaxdiff.sampling.pipeline import Pipeline

    root, pipe, _ = world
    out = root / "record.json"
    assert cs.run(_args(root, "--out", out)) == 0
    table = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert "| edit |" in table and "| spm |" in table
    assert record["method"] == "exact" and record["players"] == ["edit", "spm"]
    rows = {tuple(r["members"]): r for r in record["coalitions"]}
    assert set(rows) == {(), ("edit",), ("spm",), ("edit", "spm")}
    assert all(r["n_images"] == 4 and r["cached"] == 0 for r in rows.values())
    U = {k: r["D"] - rows[()]["D"] for k, r in rows.items()}
    assert abs(U[("edit",)]) > 1e-3 and abs(U[("spm",)]) > 1e-3  # the deltas change the images
    phi_edit = 0.5 * U[("edit",)] + 0.5 * (U[("edit", "spm")] - U[("spm",)])
    assert record["phi"]["edit"] == pytest.approx(phi_edit, rel=1e-9, abs=1e-9)
    assert record["phi"]["edit"] + record["phi"]["spm"] == pytest.approx(U[("edit", "spm")], abs=1e-9)
    assert record["leave_one_out"]["spm"] == pytest.approx(U[("edit", "spm")] - U[("edit",)], abs=1e-9)
    assert len(list((root / "c").glob("*.npz"))) == 8  # 4 coalitions x 2 seeds

    # D is the probe FD of the cached images; the base's images are the pipeline's own for those seeds.
    base_files = sorted((root / "c").glob("base-s*.npz"))
    images = np.concatenate([np.load(f)["images"] for f in base_files])
    real = ev.probe_features(ev.read_images(root / "ref"))
    d = frechet.frechet_distance_few(
        *frechet.feature_statistics(real), *frechet.feature_statistics(ev.probe_features(images))
    )
    assert rows[()]["D"] == pytest.approx(d, rel=1e-9)
    direct = pipe(["a red circle", "a blue square"], steps=2, guidance=record["guidance"], seed=0)
    np.testing.assert_array_equal(images[:2], np.clip(np.round(direct * 255.0), 0, 255).astype(np.uint8))

    # A rerun samples nothing and gives the same record; so does the same run by sampled permutations.
    monkeypatch.setattr(Pipeline, "__call__", lambda *a, **k: pytest.fail("sampled instead of reading the cache"))
    assert cs.run(_args(root, "--out", out)) == 0
    again = json.loads(out.read_text())
    assert again["phi"] == record["phi"] and all(r["cached"] == 2 for r in again["coalitions"])
    assert cs.run(_args(root, "--permutations", 4, "--out", out)) == 0
    sampled = json.loads(out.read_text())
    assert sampled["method"] == "permutations" and set(sampled["phi_stderr"]) == {"edit", "spm"}
    assert sum(sampled["phi"].values()) == pytest.approx(U[("edit", "spm")], abs=1e-9)


def test_bad_input_is_one_clear_line(world, tmp_path):
    import jaxdiff
    from jaxdiff.convert import checkpoint

    root, pipe, _ = world
    config = {**pipe.unet.config, "block_out_channels": [32, 32, 64]}
    checkpoint.save_checkpoint(tmp_path / "small_unet", jaxdiff.init_model(config, abstract=False))
    (tmp_path / "one.txt").write_text("a red circle\n")
    cases = [
        (["--components", f"x={tmp_path / 'missing'}"], "no such file"),
        (["--components", f"x={tmp_path / 'small_unet'}"], "not the base model's architecture: leaves of another"),
        (["--prompts", tmp_path / "one.txt", "--num-images", 1], "at least 2"),
        (["--reference", tmp_path / "nothing.npz"], "no reference"),
    ]
    for extra, message in cases:
        with pytest.raises(UserError, match=message) as e:
            cs.run(_args(root, *extra))
        assert "\n" not in str(e.value), str(e.value)
