"""tools/erasure_sweep.py: grid points, selection on validation figures, the Pareto front and the files it writes."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from jaxdiff.erase import registry

ROOT = Path(__file__).resolve().parent.parent


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep = _tool("erasure_sweep")


def _report(erasure, preservation, split="validation", floor_gap=0.5, erased_rate=0.5):
    joint = None if None in (erasure, preservation) else 2 * erasure * preservation / (erasure + preservation)
    scores = {"normalised_erasure_shown": erasure, "preservation": preservation, "joint": joint, "floor_gap": floor_gap}
    return {
        "split": split,
        "scores": scores,
        "erasure": {"word": {"erased": {"after": {"rate": erased_rate, "n": 32}}}},
        "preservation": {"n": 32},
        "warnings": [],
    }


def test_every_grid_names_a_known_method_and_its_points_are_distinct():
    assert set(sweep.GRIDS) <= set(registry.methods())
    for method in sweep.GRIDS:
        points = sweep.grid_points(method)
        names = [sweep.point_name(p) for p in points]
        assert len(set(names)) == len(points) == int(np.prod([len(v) for v in sweep.GRIDS[method].values()]))
        assert all(o.startswith("--config.") and "=" in o for o in sweep.overrides(points[0]))


def test_selection_takes_the_best_mean_joint_and_skips_a_point_that_failed_anywhere():
    cells = {
        "a": {"circle": sweep.figures(_report(0.9, 0.9)), "red": sweep.figures(_report(0.5, 0.9))},  # joint ~0.77
        "b": {"circle": sweep.figures(_report(0.8, 0.8)), "red": sweep.figures(_report(0.8, 0.8))},  # joint 0.8
        "c": {"circle": sweep.figures(_report(1.0, 1.0)), "red": sweep.figures({"failed": "boom"})},
        "d": {"circle": sweep.figures(_report(0.2, 1.0)), "red": sweep.figures(_report(0.2, 1.0))},
        "e": {"circle": sweep.figures(_report(None, 1.0)), "red": sweep.figures(_report(0.9, 1.0))},
    }
    summary = sweep.summarise(cells)
    assert summary["c"]["joint"] is None and summary["c"]["failed"] == ["red"]
    assert summary["e"]["joint"] is None  # a target left unscored
    assert summary["b"]["joint"] == pytest.approx(0.8)
    assert sweep.select(summary) == "b"
    assert sweep.pareto_front(summary) == {"a", "b", "d"}  # (0.7, 0.9), (0.8, 0.8), (0.2, 1.0): none dominated
    assert sweep.select({"x": {**summary["c"]}}) is None


def test_an_unreliable_floor_scores_the_valid_erased_rate_instead():
    reliable = sweep.figures(_report(1.0, 0.8))
    assert reliable["erasure"] == 1.0 and reliable["erasure_basis"] == "normalised"
    assert reliable["joint"] == pytest.approx(2 * 0.8 / 1.8)
    # the floor erases 3 points more than the unedited model: a 6-point change reads as "normalised 2.0" (shown 1.0)
    unreliable = sweep.figures(_report(1.0, 0.8, floor_gap=0.03, erased_rate=0.06))
    assert unreliable["erasure"] == 0.06 and unreliable["erasure_basis"].startswith("valid erased rate")
    assert unreliable["joint"] == pytest.approx(2 * 0.06 * 0.8 / 0.86)


def test_the_sweep_writes_its_table_selection_and_plot_from_cached_cells(tmp_path, monkeypatch):
    """main() on cells that are already on disk: no erase run, the files it writes, the overrides it selects."""
    scorecard = _tool("erasure_scorecard")
    calls = []

    def fake_run_cell(method, target, workdir, timeout, extra, revision="", *, name="", attacks=True, reuse_only=False):
        calls.append((method, target, name, tuple(extra), attacks))
        lam = float(next(e for e in extra if e.startswith("--config.uce.lam=")).split("=")[1])
        return _report(min(1.0, 2 * lam), max(0.05, 1.0 - lam / 10))

    monkeypatch.setattr(scorecard, "run_cell", fake_run_cell)
    monkeypatch.setattr(scorecard, "code_revision", lambda method="": "rev")
    monkeypatch.setattr(sweep, "_scorecard", lambda: scorecard)
    out = tmp_path / "sweep.md"
    argv = ["--methods", "uce", "--targets", "circle,red", "--workdir", str(tmp_path / "w"), "--out", str(out)]
    assert sweep.main(argv) == 0
    assert len(calls) == 2 * len(sweep.grid_points("uce"))
    assert all("--config.eval.split=validation" in c[3] and c[4] is False for c in calls)
    record = json.loads(out.with_suffix(".json").read_text())
    chosen = record["selected"]["uce"]
    assert chosen["setting"].startswith("uce.lam=0.5")  # min(1, 2λ) vs 1 − λ/10: λ = 0.5 has the best joint score
    assert "--config.uce.lam=0.5" in chosen["overrides"]
    text = out.read_text()
    assert "**uce.lam=0.5" in text and "validation" in text
    assert "Noise: at n = 32" in text and "Wilson interval" in text  # the sweep says how far apart is noise
    assert out.with_suffix(".png").stat().st_size > 1000
    selected = {m: r["overrides"] for m, r in record["selected"].items()}
    assert selected["uce"] == chosen["overrides"]  # what erasure_scorecard.py --settings reads


def test_list_and_bad_methods(capsys):
    assert sweep.main(["--list", "--methods", "uce,spm"]) == 0
    assert "uce: 12 points" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sweep.main(["--methods", "nope"])
    assert "no grid for ['nope']" in capsys.readouterr().err


def test_reuse_only_never_runs_a_cell(tmp_path):
    scorecard = _tool("erasure_scorecard")
    report = scorecard.run_cell("uce", "circle", tmp_path, 10, [], "abc123", name="x", reuse_only=True)
    assert report == {"failed": "no finished cell of revision abc123"} and not (tmp_path / "x").exists()


def test_other_anchor_resolves_per_target_and_replaces_a_methods_own_anchor():
    scorecard = _tool("erasure_scorecard")
    point = {"uce.lam": 2.0, "anchor": "@other"}
    assert sweep.point_name(point) == "uce.lam=2,anchor=@other"
    assert sweep.point_name({"uce.lam": 2.0, "anchor": ""}) == "uce.lam=2"  # the preset's own anchor: no override
    assert sweep.overrides({"uce.lam": 2.0, "anchor": ""}) == ["--config.uce.lam=2.0"]
    extra = sweep.overrides(point)
    assert scorecard.resolve_extra(extra, "circle") == ["--config.uce.lam=2.0", "--config.anchor=square"]
    assert scorecard.resolve_extra(extra, "red")[-1] == "--config.anchor=green"
    # a method that brings its own anchor (Concept Ablation) takes the override instead of adding a second one
    args = scorecard.cell_args("ablation", "circle", ["--config.anchor=triangle"])
    assert not any(a.startswith("--config.anchor=") for a in args)


def test_a_grid_from_the_command_line_replaces_the_methods_grid(capsys):
    grid = sweep.parse_grid("train.steps=300,600; train.retain_weight=1.0,3.0;anchor=@other")
    assert grid == {"train.steps": (300, 600), "train.retain_weight": (1.0, 3.0), "anchor": ("@other",)}
    points = sweep.grid_points("ablation", grid)
    assert len(points) == 4
    # floats keep their dot in the overrides, as the presets' own cells were keyed
    assert sweep.overrides(points[0]) == [
        "--config.train.steps=300",
        "--config.train.retain_weight=1.0",
        "--config.anchor=@other",
    ]
    assert sweep.main(["--list", "--methods", "ablation", "--grid", "train.steps=300,600"]) == 0
    assert "ablation: 2 points: train.steps [300, 600]" in capsys.readouterr().out
    for bad in ("train.steps", "=1", "train.steps=", ";"):
        with pytest.raises(SystemExit):
            sweep.main(["--list", "--methods", "ablation", "--grid", bad])
        assert "--grid" in capsys.readouterr().err
