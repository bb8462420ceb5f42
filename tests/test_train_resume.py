"""Nothing lost, nothing changed: kill -9 mid-run and resume gives bitwise the final state of an uninterrupted run."""

import os
import signal
import subprocess
import time

import train_worker as tw

from jaxdiff.errors import EXIT_PREEMPTED

# Slow reads (0.03 s a record, 8 a batch) leave time to kill the run between checkpoints; EMA and the
# learning-rate warm-up make sure every part of the state has to come back exactly.
OVERRIDES = (
    "--config.total_steps=8",
    "--config.checkpoint.every_steps=2",
    "--config.train.ema_decay=0.9",
    "--config.optimizer.warmup_steps=3",
    "--config.data.source=train_worker:slow_source",
    "--config.data.synthetic.num_records=24",  # 3 batches per epoch: the run crosses epochs
)


def test_kill_9_mid_run_then_resume_gives_bitwise_identical_final_state(tmp_path):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    tw.run_train(reference, *OVERRIDES)

    proc = subprocess.Popen(
        tw.train_command(interrupted, *OVERRIDES),
        env=tw.env(),
        cwd=tw.ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 900  # a loaded CI host can take minutes to start and compile
        while not tw.committed_steps(interrupted) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stderr.read()}"
        steps_at_kill = tw.committed_steps(interrupted)
        assert steps_at_kill and max(steps_at_kill) < 8
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    resumed = tw.run_train(interrupted, *OVERRIDES)
    assert tw.committed_steps(interrupted)[-1] == 8

    expected, data_a, _ = tw.load_state(reference, 8, *OVERRIDES)
    actual, data_b, _ = tw.load_state(interrupted, 8, *OVERRIDES)
    assert int(actual.step) == 8 and int(actual.data_position) == 8
    assert data_a == data_b and data_b["epoch"] == 2 and data_b["position"] == 2
    assert tw.bitwise_equal(actual.params, expected.params), "params differ after kill -9 and resume"
    assert tw.bitwise_equal(actual.opt_state, expected.opt_state), "optimiser state differs"
    assert tw.bitwise_equal(actual.ema, expected.ema), "EMA params differ"
    assert tw.bitwise_equal(actual.rng, expected.rng)
    assert "compiled the train step" in resumed.stdout + resumed.stderr


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    workdir = tmp_path / "run"
    # Fast steps and a long run: the signal lands mid-run however fast the machine (8 slow steps once finished
    # before the signal on CI); no periodic checkpoint, so the only one before the end is the SIGTERM save.
    total = 150
    overrides = (
        f"--config.total_steps={total}",
        "--config.checkpoint.every_steps=100000",
        "--config.log.every_steps=5",
        "--config.data.synthetic.num_records=24",
    )
    proc = subprocess.Popen(
        tw.train_command(workdir, *overrides),
        env=tw.env(),
        cwd=tw.ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Generous: a loaded CI host once took 134 s to compile this step, and a 180 s wait sent the signal at step 1.
        deadline = time.time() + 900
        metrics = workdir / "metrics.jsonl"
        # the first logged step (log.every_steps=5) means the loop is running
        while not (metrics.exists() and metrics.stat().st_size) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before the signal:\n{proc.communicate()[0]}"
        assert metrics.exists() and metrics.stat().st_size, "no step logged in 900 s: the signal would not land mid-run"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_PREEMPTED, out  # a scheduler requeues it instead of calling it done
    assert "preempted" in out
    saved = tw.committed_steps(workdir)
    assert len(saved) == 1 and 5 <= saved[0] < total, (saved, out)
    resumed = tw.run_train(workdir, *overrides)
    assert f"step {saved[0]}: compiled the train step" in resumed.stdout + resumed.stderr
    assert tw.committed_steps(workdir)[-1] == total
