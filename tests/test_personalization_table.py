"""tools/personalization_table.py on synthetic results: rows with n and intervals, what a JSON lacks, stale and
unknown revisions, a missing result naming its command, the overview picture and --run's manifest."""

import json
import os
import sys

import numpy as np

from jaxdiff.erase.evaluate import wilson

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import personalization_table as pt  # noqa: E402


def _setup(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    (tmp_path / "tool.py").write_text("print('eval')\n")
    res = {
        "results": {
            "plain": {"n": 40, "hit": 30, "change": 0.25},
            "new": {"n": 40, "hit": 36, "change": 0.1, "psnr": [30.0, 32.0, 31.0, float("inf")]},
        },
        "ready": {"rate": 0.5, "k": 5, "n": 10, "ci": [0.2, 0.8]},
    }

    def extract(r):
        rows = []
        for name, m in r["results"].items():
            rows.append(pt.Row(name, "hit rate", pt._rate(m, "hit")))
            rows.append(pt.Row(name, "pixel change", m["change"]))
            if "psnr" in m:
                rows.append(pt.Row(name, "PSNR", {"values": m["psnr"]}))
        rows.append(pt.Row("ready", "given interval", r["ready"]))
        return rows

    entry = pt.Entry("m", "Method M", "out/m.json", "python tool.py --n 40", ("src", "tool.py"), extract, "m.png")
    missing = pt.Entry("gone", "Gone", "out/gone.json", "python gone_eval.py", ("src",), pt.generic)
    return res, entry, missing


def _write(tmp_path, res):
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "m.json").write_text(json.dumps(res))


def test_rows_carry_n_and_intervals_and_say_what_the_json_lacks(tmp_path):
    res, entry, missing = _setup(tmp_path)
    _write(tmp_path, res)
    lines, messages = pt.table(tmp_path, [entry, missing])
    body = [line for line in lines[2:] if line.startswith("| plain") or line.startswith("| new")]
    hit = next(line for line in body if "plain | hit rate" in line)
    lo, hi = wilson(30, 40)
    assert "30/40 = 75 %" in hit and "| 40 |" in hit and f"[{100 * lo:.0f}, {100 * hi:.0f}] % (Wilson, from k/n)" in hit
    change = next(line for line in body if "plain | pixel change" in line)
    assert "0.25 | not in JSON | not in JSON" in change
    psnr = next(line for line in body if "PSNR" in line)
    v = np.array([30.0, 32.0, 31.0])
    half = 1.96 * v.std(ddof=1) / np.sqrt(3)
    assert "| 31 | 3 |" in psnr and f"[{31 - half:.3g}, {31 + half:.3g}] (mean ± 1.96 SE)" in psnr
    given = next(line for line in lines if "given interval" in line)
    assert "5/10 = 50 % | 10 | [20, 80] % |" in given  # the JSON's own interval, no note
    assert "`python tool.py --n 40`" in lines[2] and "revision unknown" in lines[2]


def test_missing_result_is_a_row_and_a_message_naming_the_command(tmp_path):
    res, entry, missing = _setup(tmp_path)
    lines, messages = pt.table(tmp_path, [entry, missing])
    assert any("| Gone | - | missing |" in line and "`python gone_eval.py`" in line for line in lines)
    assert "gone: no out/gone.json; produce it with: python gone_eval.py" in messages
    assert any(m.startswith("m: no out/m.json") for m in messages)
    doc = pt.document(lines, messages, None)
    assert "python gone_eval.py" in doc.split("Missing or unreadable results:")[1]


def test_unreadable_result_names_the_command(tmp_path):
    res, entry, _ = _setup(tmp_path)
    _write(tmp_path, {"something": "else"})
    lines, messages = pt.table(tmp_path, [entry])
    assert "unreadable (KeyError)" in lines[2] and "rerun: python tool.py --n 40" in messages[0]


def test_stale_detection_from_the_json_sources(tmp_path):
    res, entry, _ = _setup(tmp_path)
    _write(tmp_path, {**res, "sources": pt.source_hashes(entry.sources, tmp_path)})
    lines, _ = pt.table(tmp_path, [entry])
    assert "current (sources as at the run, from the JSON)" in lines[2]
    (tmp_path / "src" / "a.py").write_text("x = 2\n")  # a source edited after the run
    lines, _ = pt.table(tmp_path, [entry])
    assert "stale: src changed since the run" in lines[2]
    (tmp_path / "src" / "b.py").write_text("")  # a new file in a source folder counts too
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    assert "stale: src changed" in pt.table(tmp_path, [entry])[0][2]


def test_run_records_sources_in_the_manifest_while_the_result_is_unchanged(tmp_path, monkeypatch):
    res, entry, _ = _setup(tmp_path)
    monkeypatch.setattr(pt, "MANIFEST", "out/manifest.json")
    calls = []

    def fake_run(argv, cwd):
        calls.append(argv)
        _write(tmp_path, res)
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(pt.subprocess, "run", fake_run)
    assert pt.run(entry, tmp_path) == 0
    assert calls[0][:3] == ["nice", "-n", "10"] and calls[0][-3:] == ["tool.py", "--n", "40"]
    manifest = pt.load_manifest(tmp_path)
    assert manifest["m"]["sources"] == pt.source_hashes(entry.sources, tmp_path)
    assert "current (sources as at the run, from the manifest)" in pt.table(tmp_path, [entry], manifest)[0][2]
    _write(tmp_path, {**res, "ready": {"k": 1, "n": 2}})  # rerun outside the tool: the stamp no longer applies
    assert "revision unknown" in pt.table(tmp_path, [entry], manifest)[0][2]


def test_generic_extractor_and_overview(tmp_path):
    from PIL import Image

    rows = pt.generic({"a": {"x": {"k": 1, "n": 4}, "y": {"mean": 2.0, "n": 3}}, "b": 5})
    assert [(r.method, r.measured) for r in rows] == [("a", "x"), ("a", "y")]
    assert pt.cells(rows[1].stat) == ("2", "3", "not in JSON")
    _, entry, missing = _setup(tmp_path)
    Image.new("RGB", (100, 900), (255, 0, 0)).save(tmp_path / "m.png")
    grid = pt.overview(tmp_path, [entry, missing], width=200, height=150)
    assert grid.shape == (156, 180 + 200, 3) and (grid[:150, 180:] == [255, 0, 0]).all()


def test_help_and_registry_names_are_unique(capsys):
    import pytest

    with pytest.raises(SystemExit):
        pt.main(["--help"])
    assert "--run" in capsys.readouterr().out
    names = [e.name for e in pt.REGISTRY]
    assert len(set(names)) == len(names) and {"attencraft", "dreamcreature"} <= set(names)
