"""tools/tpu_plans.py: cells keyed by the sources, the best fitting plan per group, stale and pending cells named."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


plans = _tool("tpu_plans")


def _result(cell, images_per_s, fits=True):
    return {
        "key": "K",
        "task": cell.task,
        "mesh": {"data": 1, "fsdp": 16},
        "devices": 16,
        "batch": cell.batch,
        "peak_bytes": 7 * 2**30,
        "hbm_capacity_bytes": 16 * 2**30,
        "fits": fits,
        "roofline_step_s": cell.batch / images_per_s,
        "images_per_s": images_per_s,
        "mfu": 0.3,
        "compile_s": 600.0,
    }


def test_every_cell_is_a_valid_aot_compile_command_and_names_are_unique():
    aot = _tool("aot_compile")
    names = [c.name for c in plans.GRID]
    assert len(set(names)) == len(names)
    for cell in plans.GRID:
        args = aot.parse_args(cell.flags())
        assert (args.model, args.topology, args.batch, args.res, args.task) == (
            cell.model,
            cell.topology,
            cell.batch,
            cell.res,
            cell.task,
        )
        assert aot.parse_mesh(args.mesh)  # a mesh the tool accepts
        assert args.weights == cell.weights


def test_the_table_takes_the_fastest_fitting_plan_and_lists_stale_and_missing_cells(tmp_path):
    a, b, c, d = [cell for cell in plans.GRID if cell.group == plans.GRID[0].group][:2] + list(plans.GRID[2:4])
    (tmp_path / f"{a.name}.json").write_text(json.dumps(_result(a, 400.0)))
    (tmp_path / f"{b.name}.json").write_text(json.dumps(_result(b, 900.0, fits=False)))  # faster, does not fit
    (tmp_path / f"{c.name}.json").write_text(json.dumps({**_result(c, 100.0), "key": "OLD"}))
    (tmp_path / f"{d.name}.json").write_text(json.dumps({"failed": "out of host memory", "key": "K"}))
    keys = dict.fromkeys(plans.SOURCES, "K")
    assert plans.state(a, tmp_path, keys)[0] == "done" and plans.state(c, tmp_path, keys)[0] == "stale"
    assert plans.state(d, tmp_path, keys)[0] == "failed"
    assert plans.state(plans.GRID[5], tmp_path, keys)[0] == "missing"
    assert plans.state(a, tmp_path, {**keys, "train": "NEW"})[0] == "stale"
    text = plans.markdown([a, b, c, d, plans.GRID[5]], tmp_path, keys)
    rows = [line for line in text.splitlines() if line.startswith(f"| **best** {a.model}")]
    assert len(rows) == 1 and "| 400.0 |" in rows[0]  # the fitting one, not the faster one that does not fit
    assert "**does not fit**" in text
    assert f"- stale: `{c.command()}`" in text and f"- failed: out of host memory: `{d.command()}`" in text
    assert f"- missing: `{plans.GRID[5].command()}`" in text and "(3 of 5 cells)" in text


def test_each_tasks_key_follows_its_own_files(tmp_path):
    for entry in {e for entries in plans.SOURCES.values() for e in entries}:
        file = tmp_path / entry if entry.endswith(".py") else tmp_path / entry / "x.py"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text("a = 1\n")
    keys = plans.source_keys(tmp_path)
    assert keys == plans.source_keys(tmp_path)
    (tmp_path / "jaxdiff" / "models" / "x.py").write_text("a = 2\n")  # every task's programs build the UNet
    changed = plans.source_keys(tmp_path)
    assert all(changed[t] != keys[t] for t in plans.SOURCES)
    (tmp_path / "jaxdiff" / "sampling" / "x.py").write_text("a = 2\n")  # not in the train step
    after = plans.source_keys(tmp_path)
    assert after["train"] == changed["train"] and after["sample"] != changed["sample"]


def test_a_failing_compile_is_recorded_with_its_error(tmp_path):
    cell = plans.Cell("tiny", 64, "v9z:1x1", "train", "fsdp=1", 2)
    record = plans.compute(cell, tmp_path, "K", timeout=900)
    assert "failed" in record and record["key"] == "K" and record["cell"]["topology"] == "v9z:1x1"
    keys = dict.fromkeys(plans.SOURCES, "K")
    assert plans.state(cell, tmp_path, keys) == ("failed", json.loads((tmp_path / f"{cell.name}.json").read_text()))
    assert not list(tmp_path.glob("*.partial.json"))


def test_bad_flags_are_one_line(capsys):
    with pytest.raises(SystemExit):
        plans.main(["--run", "some"])
    assert "--run 'some'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plans.main(["--only", "sd99"])
    assert "matches no cell" in capsys.readouterr().err


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed: no TPU topology to lower for"
)
def test_a_stale_cell_whose_program_is_unchanged_is_current_again_and_a_changed_one_is_not(tmp_path):
    cell = plans.Cell("tiny", 64, "v5e:2x2", "train", "fsdp=4", 8)
    lowered = tmp_path / "lowered.json"
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "aot_compile.py"),
        *cell.flags(),
        "--lower-only",
        "--json",
        str(lowered),
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    digest = json.loads(lowered.read_text())["program_sha256"]
    keys = {**dict.fromkeys(plans.SOURCES, "K"), "train": "NEW"}
    path = tmp_path / f"{cell.name}.json"
    path.write_text(json.dumps({**_result(cell, 100.0), "key": "OLD", "program_sha256": digest}))
    assert plans.state(cell, tmp_path, keys)[0] == "stale"
    assert plans.revalidate(cell, tmp_path, "NEW", timeout=900)
    state, record = plans.state(cell, tmp_path, keys)
    assert state == "done" and record["computed_under_key"] == "OLD" and record["images_per_s"] == 100.0
    path.write_text(json.dumps({**_result(cell, 100.0), "key": "OLD", "program_sha256": "0" * 16}))
    assert not plans.revalidate(cell, tmp_path, "NEW", timeout=900)
    assert plans.state(cell, tmp_path, keys)[0] == "stale"


def test_a_program_too_big_for_the_chip_is_a_result_not_retried(tmp_path):
    cell = next(c for c in plans.GRID if c.task == "distill")
    oom = "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, temporaries (21.85G) > 15.75G."
    (tmp_path / f"{cell.name}.json").write_text(json.dumps({"failed": oom, "key": "K"}))
    keys = dict.fromkeys(plans.SOURCES, "K")
    assert plans.state(cell, tmp_path, keys)[0] == "too_big"
    assert plans.state(cell, tmp_path, {**keys, "distill": "NEW"})[0] == "stale"  # new code: measured again
    text = plans.markdown([cell], tmp_path, keys)
    assert "## Does not fit" in text and "Ran out of memory on HBM" in text and "Not computed yet" not in text
    assert plans.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "t.md"), "--only", "v5e:2x2", "--list"]) == 0


def test_only_picks_cells_by_distillation_method(tmp_path, capsys):
    assert plans.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "t.md"), "--only", "lcm", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = [c for c in plans.GRID if c.method == "lcm"]
    assert expected and len(lines) == len(expected) and all("--method lcm" in x for x in lines)


def test_only_combines_kinds_and_takes_alternatives_within_one(tmp_path, capsys):
    def listed(only):
        assert plans.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "t.md"), "--only", only, "--list"]) == 0
        return capsys.readouterr().out.strip().splitlines()

    sd15_sampling = [c for c in plans.GRID if c.model == "sd15" and c.task == "sample"]
    lines = listed("sd15,sample")
    assert sd15_sampling and len(lines) == len(sd15_sampling)
    assert all("--model sd15" in x and "--task sample" in x for x in lines)
    train = [c for c in plans.GRID if c.model in ("sd15", "sd21") and c.task == "train"]
    lines = listed("sd15,sd21,train")
    assert len(lines) == len(train) and all("--task train" in x and "--model sdxl" not in x for x in lines)
    with pytest.raises(SystemExit):  # one unknown value is an error, not a silently wider or empty selection
        plans.main(["--only", "sd15,sampel"])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from Linux /proc")
def test_a_compile_past_the_host_memory_limit_is_killed_and_named():
    hog = [
        sys.executable,
        "-c",
        "import time; x = bytearray(400 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(60)",
    ]
    code, _, _, why = plans.run_guarded(hog, timeout=60, max_rss_gb=0.2)
    assert code is None and "passed 0.2 GB of host memory" in why
    code, out, _, why = plans.run_guarded([sys.executable, "-c", "print('ok')"], timeout=60, max_rss_gb=0.2)
    assert (code, out.strip(), why) == (0, "ok", "")
    code, _, _, why = plans.run_guarded(
        [sys.executable, "-c", "import time; time.sleep(60)"], timeout=1, max_rss_gb=None
    )
    assert code is None and why == "compile ran past 1 s"


def test_a_compile_refused_after_lowering_keeps_its_program_hash_for_revalidation(tmp_path, monkeypatch):
    cell = next(c for c in plans.GRID if c.task == "distill")
    stderr = (
        "lowered in 5.1 s (program sha256 0123456789abcdef); compiling with XLA:TPU ...\n"
        "jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, temporaries (21.85G) > 15.75G.\n"
    )
    monkeypatch.setattr(plans, "run_guarded", lambda cmd, timeout, max_rss_gb: (1, "", stderr, ""))
    record = plans.compute(cell, tmp_path, "K", timeout=60)
    assert record["program_sha256"] == "0123456789abcdef" and "RESOURCE_EXHAUSTED" in record["failed"]
    assert plans.state(cell, tmp_path, dict.fromkeys(plans.SOURCES, "K"))[0] == "too_big"
    # A compile that fails before lowering has no program to compare: no hash.
    monkeypatch.setattr(plans, "run_guarded", lambda cmd, timeout, max_rss_gb: (1, "", "SystemExit: bad --res\n", ""))
    assert "program_sha256" not in plans.compute(cell, tmp_path, "K", timeout=60)


def test_every_plan_has_an_o0_twin_whose_fit_needs_a_margin_and_is_compared_with_the_default(tmp_path):
    defaults = [c for c in plans.GRID if c.opt == "default"]
    twins = [c for c in plans.GRID if c.opt == "O0"]
    assert len(twins) == len(defaults) and {plans.dataclasses.replace(c, opt="default") for c in twins} == set(defaults)
    aot = _tool("aot_compile")
    assert all(aot.parse_args(c.flags()).opt_level == "O0" and c.name.endswith("-O0") for c in twins)
    assert all("--opt-level" not in c.flags() for c in defaults)

    a, b = [c for c in twins if c.group == twins[0].group][:2]
    ref = plans.dataclasses.replace(a, opt="default")
    tight = {**_result(a, 900.0), "peak_bytes": int(15 * 2**30)}  # fits the chip, not the 10 % margin
    roomy = {**_result(b, 400.0), "peak_bytes": 7 * 2**30}
    default = {**_result(ref, 500.0), "peak_bytes": int(7.5 * 2**30), "bytes_accessed_per_device": 2e11}
    for cell, record in ((a, tight), (b, roomy), (ref, default)):
        record = {**record, "bytes_accessed_per_device": record.get("bytes_accessed_per_device", 1e11)}
        (tmp_path / f"{cell.name}.json").write_text(json.dumps(record))
    keys = dict.fromkeys(plans.SOURCES, "K")
    text = plans.markdown([a, b, ref], tmp_path, keys)
    best = [line for line in text.splitlines() if line.startswith("| **best**")]
    # One best per level: the default's only cell, and at O0 the slower plan with room, not the marginal one.
    assert len(best) == 2 and "| default |" in best[0] and "| 500.0 |" in best[0]
    assert "| O0 |" in best[1] and "| 400.0 |" in best[1]
    assert "**marginal** (< 10 % spare)" in text
    assert "## O0 against the default level" in text and "| 7.50 → 15.00 (+100.0 %) | 200 → 100 GB |" in text
