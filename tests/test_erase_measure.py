"""Erasure measurement: valid-only counting, Wilson intervals, normalised erasure, joint score, warnings."""

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from jaxdiff.data import shapes as S
from jaxdiff.erase import evaluate as ev
from jaxdiff.erase import run
from jaxdiff.erase.config import AUTO, base_config, default_preserve
from jaxdiff.errors import UserError


def _scorecard():
    """tools/erasure_scorecard.py as a module (tools/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "tools" / "erasure_scorecard.py"
    spec = importlib.util.spec_from_file_location("erasure_scorecard", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def probe():
    from jaxdiff.erase.job import probe

    return probe()


def _render(scenes, **change):
    """Renders of the scenes' single objects with the `change`d attributes (e.g. colour="green")."""
    out = []
    for s in scenes:
        (obj,) = s.objects
        out.append(S.render(dataclasses.replace(s, objects=(dataclasses.replace(obj, **change),))))
    return np.stack(out)


class ForcedChoiceProbe:
    """A probe that calls every image a red square, as a forced-choice judge does with a blob: "not a circle"."""

    def __call__(self, images):
        n = len(images)
        preds = {"shape0": np.full(n, S.SHAPES.index("square")), "colour0": np.full(n, S.COLOURS.index("red"))}
        return preds, np.zeros((n, 4))


def test_wilson_interval_matches_newcombe_1998():
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (score interval without continuity correction).
    for (k, n), (lo, hi) in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611)}.items():
        assert ev.wilson(k, n) == pytest.approx((lo, hi), abs=5e-5)
    assert ev.wilson(0, 0) is None
    r = ev.rate([True, False, False, True])
    assert (r["rate"], r["k"], r["n"]) == (0.5, 2, 4) and r["ci"][0] < 0.5 < r["ci"][1]


def test_a_broken_image_never_counts_as_erased():
    """Prompts "a red circle": only a clean red object that neither judge calls a circle is erased."""
    concept = ev.resolve("circle")
    _, scenes = ev.captions(concept, 6, seed=0)
    scenes = [dataclasses.replace(s, objects=(dataclasses.replace(s.objects[0], colour="red"),)) for s in scenes]
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    blank = np.full((32, 32, 3), 255, np.uint8)
    images = np.stack(
        [
            _render(scenes[:1], shape="square")[0],  # erased: a clean red square
            _render(scenes[1:2], shape="triangle")[0],  # erased: a clean red triangle
            _render(scenes[2:3])[0],  # the red circle itself: the pixel judge sees it (the probe here does not)
            _render(scenes[3:4], shape="square", colour="blue")[0],  # the prompt's colour lost: invalid
            noise,  # no plain background: invalid
            blank,  # no object: invalid
        ]
    )
    v = ev.erased_verdicts(ev.judge_images(ForcedChoiceProbe(), images), concept, scenes)
    np.testing.assert_array_equal(v["erased"], [True, True, False, False, False, False])
    np.testing.assert_array_equal(v["valid"], [True, True, True, False, False, False])
    assert v["probe_sees"].sum() == 0  # the old probe-only figure would call all six erased
    assert list(v["reason"][3:]) == ["wrong_colour", "background", "empty"]


def test_normalised_erasure_and_joint_score_arithmetic():
    assert ev.normalised_erasure(0.0, 0.3, 0.6) == pytest.approx(0.5)
    assert ev.normalised_erasure(0.1, 0.9, 0.5) == pytest.approx(2.0)  # beyond the floor: raw value kept
    assert ev.normalised_erasure(0.2, 0.1, 0.5) == pytest.approx(-1 / 3)  # fewer erased than before the edit
    assert ev.normalised_erasure(0.3, 0.9, 0.3) is None  # no room between unedited and floor
    assert ev.harmonic_mean(2.0, 0.5) == pytest.approx(2 / 3)  # clipped to 1 first
    assert ev.harmonic_mean(0.6, 0.9) == pytest.approx(0.72)
    assert ev.harmonic_mean(-0.5, 0.9) == 0.0 and ev.harmonic_mean(None, 0.9) is None


def test_paired_distance_is_zero_on_itself_and_brackets_the_mean():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((40, 8))
    assert ev.paired_distance(f, f)["mean"] == 0.0
    d = ev.paired_distance(f, f + rng.standard_normal((40, 8)))
    assert d["ci"][0] < d["mean"] < d["ci"][1] and d["n"] == 40


def _world(concept, n=16):
    sets = ev.prompt_sets(concept, n, seed=5)
    return sets, {name: _render(scenes) for name, (prompts, scenes) in sets.items() if prompts}


def _report(figures):
    return {"method": "test", "concept": "circle", "cost": {"seconds": 1.0, "peak_rss_gb": 0.1}, **figures}


def test_warning_fires_on_a_degraded_model_and_not_on_the_unedited_one(probe):
    concept = ev.resolve("circle")
    sets, before = _world(concept)
    # "Green blobs": every image of the edited model a green circle, whatever the prompt.
    degraded = {name: _render(sets[name][1], shape="circle", colour="green") for name in before}
    bad = ev.evaluate(probe, concept, before, degraded, sets)
    kinds = {w.split()[0] for w in bad["warnings"]}
    assert kinds == {"shape", "colour"}, bad["warnings"]
    assert bad["preservation"]["preserved"]["colour"]["probe"]["after"]["rate"] < 0.5
    line = run.summary(_report(bad))
    assert "WARNING: preserved shape and colour fell more than 10 points" in line and "\n" not in line
    assert "WARNING" in run.markdown({**_report(bad), "model": "shapes", "prompts": {}})

    same = ev.evaluate(probe, concept, before, before, sets)
    assert same["warnings"] == [] and "WARNING" not in run.summary(_report(same))
    assert same["scores"]["preservation"] == pytest.approx(1.0)


def test_a_clean_erasure_scores_one_and_keeps_the_probe_only_figure(probe):
    """Circles drawn as squares (colour kept), floor = triangles: erased 100 %, normalised 1, joint 1."""
    concept = ev.resolve("circle")
    sets, before = _world(concept)
    after = {**before, **{name: _render(sets[name][1], shape="square") for name in ("word", "synonyms", "heldout")}}
    floor = _render(sets["word"][1], shape="triangle")
    r = ev.evaluate(probe, concept, before, after, sets, without_word=floor)
    w = r["erasure"]["word"]
    assert w["erased"]["before"]["rate"] == 0.0 and w["erased"]["after"]["rate"] == 1.0
    assert w["probe_only"]["before"]["rate"] == 1.0 and w["probe_only"]["after"]["rate"] == 0.0
    assert w["invalid"]["after"]["rate"] == 0.0 and w["erased"]["after"]["n"] == 16
    assert r["scores"]["normalised_erasure"] == pytest.approx(1.0) and r["scores"]["joint"] == pytest.approx(1.0)
    assert r["warnings"] == []
    chance = r["preservation"]["chance"]
    assert chance == {"shape": pytest.approx(1 / 3), "colour": pytest.approx(1 / 4)}
    assert "anchor" not in w  # no anchor given

    # The same edit read as a mapping onto an anchor: squares appear instead every time, triangles never.
    for anchor, seen in (("square", 1.0), ("triangle", 0.0)):
        a = ev.evaluate(probe, concept, before, after, sets, without_word=floor, anchor=anchor)["erasure"]["word"]
        assert a["anchor"]["name"] == anchor and a["anchor"]["before"]["rate"] == 0.0
        assert a["anchor"]["after"]["rate"] == seen
    assert "anchor" not in ev.evaluate(probe, concept, before, after, sets, anchor="shape")["erasure"]["word"]


def test_preserve_defaults_to_the_models_world():
    assert base_config("uce").preserve == AUTO
    assert default_preserve(["circle"], is_shapes=True) == ["square", "triangle"]
    assert default_preserve(["crimson"], is_shapes=True) == ["green", "blue", "yellow"]
    assert default_preserve(["box", "red"], is_shapes=True) == ["circle", "triangle", "green", "blue", "yellow"]
    assert "a person" in default_preserve(["nudity"], is_shapes=False)
    c = base_config("uce")
    resolved = run._resolved(c)
    assert resolved.preserve == "square;triangle" and c.preserve == AUTO  # config.json: "auto"
    c.preserve = "square"
    assert run._resolved(c).preserve == "square"
    c.preserve = ""
    assert run._resolved(c).preserve == ""  # explicitly nothing


def test_scorecard_recomputes_a_cell_of_another_revision_or_config(tmp_path):
    import json

    scorecard = _scorecard()
    key = scorecard.cell_key(["configs/erase/uce.py:shapes", "--config.concept=circle"], "abc")
    assert key != scorecard.cell_key(["configs/erase/uce.py:shapes", "--config.concept=red"], "abc")
    assert key != scorecard.cell_key(["configs/erase/uce.py:shapes", "--config.concept=circle"], "abd")
    cell = tmp_path / "uce-circle"
    cell.mkdir()
    (cell / "report.json").write_text(json.dumps({"erasure": {}, "scores": {}}))
    assert not scorecard.reusable(cell, key)  # no key: a cell of the old scorecard
    (cell / scorecard.KEY).write_text(json.dumps(key))
    assert scorecard.reusable(cell, key)
    assert not scorecard.reusable(cell, {**key, "revision": "other"})
    (cell / "report.json").write_text(json.dumps({"erasure": {}}))  # the old probe-only report format
    assert not scorecard.reusable(cell, key)
    assert scorecard.code_revision()  # the last commit to jaxdiff/ (+ a hash of uncommitted changes)
    assert scorecard.code_revision("doco")  # the last commit to what DoCo's cells run
    preset = tmp_path / "method.py"  # a method's config file is keyed by its content, not by the commit
    preset.write_text("x = 1\n")
    first = scorecard.cell_key([f"{preset}:shapes", "--config.concept=circle"], "abc")
    assert first == scorecard.cell_key([f"{preset}:shapes", "--config.concept=circle"], "abc")
    preset.write_text("x = 2\n")
    assert first != scorecard.cell_key([f"{preset}:shapes", "--config.concept=circle"], "abc")


def test_scorecard_goal_needs_erasure_and_both_preserved_attributes_within_five_points():

    scorecard = _scorecard()

    def cell(norm, shape_after, colour_after, joint=0.9):
        kept = lambda after: {"both": {"before": {"rate": 0.98}, "after": {"rate": after}}}  # noqa: E731
        return {
            "scores": {"normalised_erasure": norm, "joint": joint},
            "preservation": {"preserved": {"shape": kept(shape_after), "colour": kept(colour_after)}},
        }

    assert scorecard.meets_goal(cell(0.8, 0.93, 0.98))  # exactly 5 points lower still counts
    assert not scorecard.meets_goal(cell(0.79, 0.98, 0.98))
    assert not scorecard.meets_goal(cell(1.2, 0.98, 0.92))  # the colour fell 6 points
    assert scorecard.meets_goal({"failed": "boom"}) is None and scorecard.meets_goal(cell(None, 1, 1)) is None
    close_floor = cell(2.0, 0.98, 0.98)  # circle: the floor 3 points above the unedited rate, 6 % erased
    close_floor["scores"]["floor_gap"] = 0.03
    close_floor["erasure"] = {"word": {"erased": {"after": {"rate": 0.06}}}}
    assert not scorecard.meets_goal(close_floor)
    close_floor["erasure"]["word"]["erased"]["after"]["rate"] = 0.85
    assert scorecard.meets_goal(close_floor)
    results = {("esd", "circle"): cell(2, 0.97, 0.97), ("esd", "box"): cell(0.9, 0.95, 0.96)}
    results[("esd", "red")] = cell(0.1, 0.97, 0.97)
    assert "- esd: **met** — on circle, box (2 of 3)" in scorecard.goal_lines(results)
    results[("esd", "box")] = {"failed": "x"}
    assert "- esd: not met — on circle (1 of 3; 1 unscored)" in scorecard.goal_lines(results)
    seeds = {("esd", "circle"): [results[("esd", "circle")], cell(0.7, 1, 1), {"failed": "x"}]}
    seeds[("esd", "red")] = [results[("esd", "red")], cell(0.9, 1, 1), cell(0.85, 0.97, 0.98)]
    lines = scorecard.goal_lines(results, seeds)
    assert "- esd: not met — on circle (1 of 3; 1 unscored); over training seeds: circle 1/3, red 2/3" in lines
    runs = [cell(1, 1, 1, joint=j) for j in (0.8, 0.6, 0.7)] + [{"failed": "x"}]
    for r, rate in zip(runs, (0.82, 0.73, 0.77)):
        r["erasure"] = {"word": {"erased": {"after": {"rate": rate}}}}
    assert scorecard.seeds_cell(runs) == "0.70 [0.60–0.80], erased 73–82% (3 seeds, 1 failed)"
    assert scorecard.seeds_cell(runs[:1]) == "–"


@pytest.mark.parametrize("word", ["circle", "red"])
def test_validation_sets_share_no_prompt_with_the_test_sets(word):
    concept = ev.resolve(word)
    test = ev.scoring_prompts(concept, 128, 1234, attack_images=16)
    sets = ev.validation_sets(concept, 32, 1234, test)
    assert set(sets) == set(ev.prompt_sets(concept, 4, 1234))  # same keys, same order of use in the erase run
    for name in ("word", "preserved"):
        prompts, scenes = sets[name]
        assert len(prompts) == len(scenes) == 32 and not set(prompts) & test, name
    assert sets["word"][0] == ev.validation_sets(concept, 32, 1234, test)["word"][0]  # deterministic
    assert all(concept.word in p for p in sets["word"][0])
    assert not sets["heldout"][0] and not sets["synonyms"][0]
    with pytest.raises(UserError, match="validation prompts of set 'word'"):
        every = {
            p for make in ev._set_makers(concept, 1234 + ev.VALIDATION_SEED_OFFSET).values() for p in make(4096)[0]
        }
        ev.validation_sets(concept, 32, 1234, test | every)


def test_the_validation_split_is_checked_before_the_edit():
    c = base_config("uce")
    c.eval.split = "validate"
    with pytest.raises(UserError, match="config.eval.split='validate' is unknown"):
        run._validate(c)
    c.eval.split, c.eval.attacks = "validation", True
    with pytest.raises(UserError, match="drop --attacks"):
        run._validate(c)


def test_the_other_anchor_names_the_next_concept_of_the_erased_ones_kind():
    from jaxdiff.erase.config import OTHER_ANCHOR, resolve_anchor

    assert resolve_anchor(OTHER_ANCHOR, ["circle"], True) == "square"
    assert resolve_anchor(OTHER_ANCHOR, ["box"], True) == "circle"  # box is the square
    assert resolve_anchor(OTHER_ANCHOR, ["red"], True) == "green"
    assert resolve_anchor("triangle", ["circle"], True) == "triangle" and resolve_anchor("", ["dog"], False) == ""
    with pytest.raises(UserError, match="needs the shapes model"):
        resolve_anchor(OTHER_ANCHOR, ["dog"], False)


def test_scorecard_time_figure_counts_the_training_seed_cells(tmp_path):

    scorecard = _scorecard()
    for name, seconds in (("trce-circle", 60), ("trce-circle-seed1", 70), ("trce-circle-seed2", 80), ("uce-red", 5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "scorecard_seconds.txt").write_text(str(seconds))
    results = {("trce", "circle"): {}, ("uce", "red"): {}}
    assert sorted(scorecard.cell_seconds(tmp_path, results)) == [5.0, 60.0]
    assert sorted(scorecard.cell_seconds(tmp_path, results, train_seeds=3)) == [5.0, 60.0, 70.0, 80.0]


def test_a_methods_cells_are_keyed_by_its_own_module_and_those_every_cell_runs():
    """DoCo's cells are not keyed by Concept Ablation's module (a change there leaves them valid), but by UCE's and
    RECE's (the attacks of every cell run them) and by everything else erasure imports."""
    scorecard = _scorecard()
    assert scorecard.method_sources("") == scorecard.SOURCES
    doco = scorecard.method_sources("doco")
    excluded = {s.removeprefix(":(exclude)") for s in doco if s.startswith(":(exclude)jaxdiff/erase/")}
    from jaxdiff.erase import registry

    assert excluded == {f"jaxdiff/erase/{m}.py" for m in registry.methods()} - {
        "jaxdiff/erase/doco.py",
        "jaxdiff/erase/uce.py",
        "jaxdiff/erase/rece.py",
    }
    assert set(scorecard.SOURCES) <= set(doco)
    assert scorecard.revision_text({"uce": "a" * 40, "rece": "a" * 40}) == f"code revision `{'a' * 12}`"
    assert scorecard.revision_text({"uce": "a" * 40, "doco": "b" * 40}) == (
        f"code revisions `{'a' * 12}` (uce), `{'b' * 12}` (doco)"
    )
