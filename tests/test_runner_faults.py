"""The fault matrix of the runner, on its two-network toy (critic ×2, then generator; EMA, a schedule, clipping):
kill -9 at several moments, SIGTERM, a torn metrics row, leftovers of a killed checkpoint writer and a changed config
each end in the state of an uninterrupted run, bitwise, or in a clear refusal."""

import json
import os
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "tests", "runner_toy.py")
STEPS, EVERY = 24, 4


def _run(workdir, *args, fault=None):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    env.pop("JAXDIFF_FAULT", None)
    if fault:
        env["JAXDIFF_FAULT"] = fault
    return subprocess.run(
        [sys.executable, TOY, str(workdir), "--steps", str(STEPS), "--every", str(EVERY), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )


def _final(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _final(_run(tmp_path_factory.mktemp("toy") / "reference"))


def test_the_toy_trains_its_generator_towards_the_data(reference):
    g = reference["generator"]
    assert g["b"] > 0.5, g  # started at 0; the data mean is 2
    assert reference["summary"]["step"] == STEPS


@pytest.mark.parametrize(
    "fault, sync",
    [
        ("step@3", False),  # mid-step, before the first checkpoint
        ("step@10", False),  # mid-step, between checkpoints 8 and 12
        ("save@8", False),  # an asynchronous checkpoint write in flight
        ("save@12", True),  # a synchronous write just returned, before anything else
        ("saved@16", False),  # right after the commit
    ],
)
def test_kill_9_at_any_moment_then_rerun_ends_bitwise_equal(tmp_path, reference, fault, sync):
    workdir = tmp_path / "run"
    extra = ("--sync",) if sync else ()
    killed = _run(workdir, *extra, fault=fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = _final(_run(workdir, *extra))
    assert resumed["leaves"] == reference["leaves"], f"state differs after a kill at {fault}"
    steps = [r["step"] for r in _rows(workdir)]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # no duplicated rows after the resume
    leftovers = [n for n in os.listdir(workdir / "checkpoints") if "tmp" in n]
    assert not leftovers, leftovers  # a killed writer's uncommitted folder is cleaned


def test_a_torn_metrics_row_and_rows_past_the_checkpoint_are_cut_on_resume(tmp_path, reference):
    workdir = tmp_path / "run"
    assert _run(workdir, fault="step@10").returncode == -signal.SIGKILL
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss_crit')  # what a kill in the middle of a write leaves
    resumed = _final(_run(workdir))
    assert resumed["leaves"] == reference["leaves"]
    rows = _rows(workdir)  # every line parses
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))


def test_sigterm_saves_exits_75_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, reference):
    workdir = tmp_path / "run"
    preempted = _run(workdir, fault="step@6:term")
    assert preempted.returncode == 75, preempted.stderr[-2000:]
    assert "preempted" in preempted.stderr
    assert sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())[-1] == 6
    resumed = _final(_run(workdir))
    assert resumed["summary"]["resumed_from"] == 6
    assert resumed["leaves"] == reference["leaves"]


def test_resuming_with_a_changed_config_names_the_keys_and_refuses_unless_allowed(tmp_path, reference):
    workdir = tmp_path / "run"
    assert _run(workdir, fault="saved@8").returncode == -signal.SIGKILL
    refused = _run(workdir, "--config-extra", "other")
    assert refused.returncode == 2
    assert "extra: '' -> 'other'" in refused.stderr and "resume_if_changed" in refused.stderr
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["extra"] == ""  # the refusal wrote nothing
    allowed = _final(_run(workdir, "--config-extra", "other", "--resume-if-changed"))
    assert allowed["summary"]["resumed_from"] == 8
    assert json.loads((workdir / "config.json").read_text())["extra"] == "other"


def test_erase_killed_mid_fine_tuning_resumes_to_the_uninterrupted_model(tmp_path):
    """A real kill -9 of `jaxdiff erase` (ESD) between checkpoints; the rerun ends with the same edited UNet."""
    argv = [
        "erase",
        "--config",
        "configs/erase/esd.py:runlocal",
        "--config.train.steps=6",
        "--config.train.checkpoint_every=2",
        "--config.eval.num_images=2",
        "--config.eval.steps=2",
        "--no-progress",
    ]

    def erase(out, fault=None):
        env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
        env.pop("JAXDIFF_FAULT", None)
        if fault:
            env["JAXDIFF_FAULT"] = fault
        cmd = [sys.executable, "-m", "jaxdiff", *argv, "--out", str(out)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)

    reference = erase(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = erase(tmp_path / "killed", fault="step@5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "killed" / "model").exists()
    resumed = erase(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 4: compiled the erasure step" in resumed.stdout + resumed.stderr  # resumed, not restarted
    weights = "model/unet/params.safetensors"
    assert (tmp_path / "killed" / weights).read_bytes() == (tmp_path / "reference" / weights).read_bytes()


def test_progress_bar_shows_the_loss_or_each_phases_loss():
    from jaxdiff.train.runner import progress_losses

    assert progress_losses({"loss": 0.5, "grad_norm": 2.0}) == {"loss": 0.5}
    phased = {"loss_fake_score": 0.3, "loss_fake_fake_score": 0.3, "loss_dm_generator": 0.9, "loss_generator": 0.9}
    phased.update(grad_norm_fake_score=1.0, grad_norm_generator=40.0, dm_grad_norm_generator=86.0)
    assert progress_losses(phased) == {"fake_score": 0.3, "generator": 0.9}
