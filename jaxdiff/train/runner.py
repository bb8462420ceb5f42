"""The one training loop: compile, resume, step, log, checkpoint, SIGTERM; `jaxdiff train`, erasure and the shapes
stages all run through `run`.

A run is a jitted `step(state, batch, frozen) -> (state, metrics)` (usually `step.build` over named networks and
phases), a way to make the first state, a batch source with a saveable position, and a workdir:

    workdir/config.json     the run's config (atomic); a resume with other values is refused unless allowed
    workdir/checkpoints/    orbax steps (state, data position, meta); uncommitted (killed) writes are ignored
    workdir/metrics.jsonl   one row per logged step; cut back to the restored step on resume
    workdir/tensorboard/    the same scalars

Faults and what they leave: kill -9 at any moment -> rerun resumes from the last committed checkpoint and ends
bitwise equal to an uninterrupted run; SIGTERM -> a checkpoint of the current step, then `errors.Preempted` (the
command exits with `errors.EXIT_PREEMPTED`); a non-finite loss or gradient -> `step.NonFiniteError` naming the
tensors (no checkpoint of that step), or a skipped update with nonfinite="skip".
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax

from jaxdiff import fileio, platforms
from jaxdiff.errors import Preempted, UserError
from jaxdiff.train import checkpoint as ckpt_lib
from jaxdiff.train import distributed
from jaxdiff.train import step as step_lib
from jaxdiff.train import writer as writer_lib

# Fault injection for the tests of the fault matrix (tests/test_runner_faults.py): JAXDIFF_FAULT="MOMENT@STEP"
# sends this process SIGKILL at that moment of that step ("MOMENT@STEP:term": SIGTERM, a preemption notice).
# MOMENT: "step" (the step is dispatched, its result not yet read), "save" (a checkpoint write was started and, when
# asynchronous, is in flight), "saved" (the checkpoint is committed, nothing after it done).
FAULT_ENV = "JAXDIFF_FAULT"


def _fault(moment: str, step: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    where, _, how = spec.partition(":")
    if where == f"{moment}@{step}":
        os.kill(os.getpid(), signal.SIGTERM if how == "term" else signal.SIGKILL)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How the loop runs (not what it computes)."""

    total_steps: int
    checkpoint_every: int = 0  # 0: only at the end (and on SIGTERM)
    keep: int = 3  # checkpoints kept
    async_save: bool = True
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True
    nonfinite: str = "stop"  # "stop" | "skip"
    max_skipped_steps: int = 0  # with "skip": stop after this many skipped updates in a row (0 = never)
    images_per_step: int = 1  # for the images/s column
    label: str = "train step"  # what the compile message calls the step
    resume_if_changed: bool = False  # resume although the saved config differs
    resume_hint: str = "--config.resume_if_changed=true"  # how the caller's users allow that (in the refusal)


class StepBatches:
    """Batches as a pure function of the step index (`batch_fn(i)`), placed with `sharding`; the saved position is
    the step, so a resumed run sees the same batches."""

    def __init__(self, batch_fn: Callable[[int], dict], sharding=None):
        self.batch_fn, self.sharding, self.step = batch_fn, sharding, 0

    def state(self) -> dict:
        return {"step": self.step}

    def restore(self, state: dict) -> None:
        self.step = int(state["step"])

    def batches_consumed(self) -> int:
        return self.step

    def __next__(self) -> dict:
        batch = self.batch_fn(self.step)
        self.step += 1
        return batch if self.sharding is None else jax.device_put(batch, self.sharding)

    def close(self) -> None:
        pass


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def changed_keys(saved: dict, current: dict, ignore: tuple[str, ...] = ("resume_if_changed",)) -> list[str]:
    """'key: old -> new' for every config key whose value differs (added and removed keys included)."""
    a, b = _flat(saved), _flat(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if key.split(".")[-1] in ignore:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


def _check_config(workdir: str, config: dict | None, resuming: bool, settings: Settings) -> None:
    """Refuse to resume a run whose saved config differs (unless allowed); then save this config atomically."""
    if config is None or jax.process_index() != 0:
        return
    path = os.path.join(workdir, "config.json")
    if resuming and os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        diff = changed_keys(saved, config)
        if diff and not settings.resume_if_changed:
            raise UserError(
                f"{workdir} holds a run with another config; changed: {'; '.join(diff)}. Rerun with the saved "
                f"values, use another workdir, or allow it ({settings.resume_hint})"
            )
    fileio.atomic_write_text(path, json.dumps(config, indent=2) + "\n")


def run(
    step_fn: Callable,
    init_state: Callable[[], Any],
    abstract_state: Any,
    batches: Any,
    workdir: str,
    settings: Settings,
    *,
    frozen: Any = None,
    leaf_names: dict[str, list[str]] | None = None,
    config: dict | None = None,
    step_flops_scale: int = 1,
    where: str = "",
) -> tuple[Any, dict]:
    """Train until `settings.total_steps`, resuming from `workdir/checkpoints`; returns (final state, summary).

    step_fn: jitted step(state, batch, frozen) -> (state, metrics) with the state donated; init_state(): the first
    state, placed (called only without a checkpoint); abstract_state: ShapeDtypeStructs with this run's shardings
    (what a checkpoint is restored onto); batches: `next()`, `state()`, `restore()`, `batches_consumed()`,
    `close()` (train.data.BatchIterator or StepBatches); frozen: the placed frozen models, a jit argument.
    where: how the compile message names the devices (e.g. the mesh). summary: {"step", "resumed_from", "loss",
    "last" (last logged scalars), "compile_s", "skipped"}.
    Raises errors.Preempted after saving on SIGTERM, step.NonFiniteError on a non-finite update with "stop".
    """
    main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    first = jax.tree_util.tree_leaves(abstract_state)[0]
    platform = platforms.of(first.sharding) if getattr(first, "sharding", None) is not None else None
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=settings.keep, async_save=settings.async_save, platform=platform
    )
    checkpointer.install_sigterm()
    writer = None
    try:
        start = checkpointer.latest_step()
        _check_config(workdir, config, start is not None, settings)
        if start is not None:
            state, data_state, _ = checkpointer.restore(start, abstract_state)
            batches.restore(data_state)
            if int(state.data_position) != batches.batches_consumed():
                raise ValueError(
                    f"checkpoint {start}: the state consumed {int(state.data_position)} batches but the data iterator "
                    f"says {batches.batches_consumed()}"
                )
        else:
            start = 0
            state = init_state()
        if main:
            writer_lib.truncate_jsonl(workdir, start)
        if start >= settings.total_steps:
            return state, {
                "step": start,
                "resumed_from": start,
                "loss": None,
                "last": {},
                "compile_s": 0.0,
                "skipped": 0,
            }

        batch = next(batches)
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, batch, frozen).compile()
        compile_s = time.perf_counter() - t0
        distributed.barrier(f"{settings.label} compiled")
        flops = writer_lib.flops_of(compiled)
        writer = writer_lib.MetricsWriter(
            workdir,
            total_steps=settings.total_steps,
            initial_step=start,
            images_per_step=settings.images_per_step,
            step_flops=flops * step_flops_scale if flops else None,
            tensorboard=settings.tensorboard,
            progress=settings.progress,
            enabled=main,
        )
        writer.message(
            f"step {start}: compiled the {settings.label} in {compile_s:.1f} s"
            + (f" ({flops * step_flops_scale / 1e12:.3g} TFLOP per step)" if flops else "")
            + (", resumed" if start else "")
            + f"; {where or f'{jax.device_count()} device(s)'}, {jax.process_count()} process(es)"
        )
        log = _Log(settings, checkpointer, writer, leaf_names or {})
        step = start
        while True:
            state, metrics = compiled(state, batch, frozen)
            step += 1
            _fault("step", step)
            log.pending(step, metrics)
            preempted = checkpointer.preempted(step)
            if (
                (settings.checkpoint_every and step % settings.checkpoint_every == 0)
                or step == settings.total_steps
                or preempted
            ):
                log.flush()  # never checkpoint a step whose non-finite report has not been read
                checkpointer.save(step, state, batches.state(), {"step": step, "config": config})
                _fault("save", step)
                if _fault_waits(step):
                    checkpointer.wait()
                    _fault("saved", step)
            if preempted:
                checkpointer.wait()
                writer.message(f"preempted (SIGTERM) at step {step}: checkpoint saved; rerun the command to resume")
                raise Preempted(step, workdir)
            if step == settings.total_steps:
                break
            batch = next(batches)
        log.flush()
        return state, log.summary(step, start, compile_s)
    finally:
        batches.close()
        checkpointer.close()
        if writer is not None:
            writer.close()


def _fault_waits(step: int) -> bool:
    return os.environ.get(FAULT_ENV, "").startswith(f"saved@{step}")


class _Log:
    """Host-side bookkeeping: metrics are read one step late so the host does not stall the device."""

    def __init__(self, settings: Settings, checkpointer, writer, names):
        self.settings, self.checkpointer, self.writer, self.names = settings, checkpointer, writer, names
        self._pending = None
        self.skipped = self.skipped_in_a_row = 0
        self.last: dict = {}

    def pending(self, step: int, metrics) -> None:
        self.flush()
        self._pending = (step, metrics)

    def flush(self) -> None:
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        m = jax.device_get(metrics)
        report = step_lib.nonfinite_report(m, self.names, step) if "finite" in m else None
        scalars = {k: v for k, v in m.items() if k != "finite" and getattr(v, "ndim", 0) == 0}
        self.last = {k: float(v) for k, v in scalars.items()}
        if report is not None:
            last_ckpt = self.checkpointer.latest_step()
            if self.settings.nonfinite == "stop":
                self.checkpointer.wait()
                raise step_lib.NonFiniteError(
                    f"{report}. The update was not applied and no checkpoint of this step is written "
                    f"(nonfinite='stop'; last checkpoint: {last_ckpt})"
                )
            self.skipped += 1
            self.skipped_in_a_row += 1
            self.writer.message(f"skipped update: {report}")
            self.writer.write(step, {**scalars, "skipped": 1}, timed=False)
            limit = self.settings.max_skipped_steps
            if limit and self.skipped_in_a_row >= limit:
                self.checkpointer.wait()
                raise step_lib.NonFiniteError(f"{self.skipped_in_a_row} updates in a row skipped; last: {report}")
        else:
            self.skipped_in_a_row = 0
        self.writer.advance(1, **progress_losses(self.last))
        every = max(int(self.settings.log_every), 1)
        if report is None and (step % every == 0 or step == self.settings.total_steps):
            self.writer.write(step, scalars)

    def summary(self, step: int, start: int, compile_s: float) -> dict:
        return {
            "step": step,
            "resumed_from": start,
            "loss": self.last.get("loss"),
            "last": self.last,
            "compile_s": compile_s,
            "skipped": self.skipped,
        }


def progress_losses(metrics: dict) -> dict:
    """What the progress bar shows: "loss", or with several phases each phase's loss ("loss_<phase>" as <phase>)."""
    if "loss" in metrics:
        return {"loss": metrics["loss"]}
    phases = [k[len("grad_norm_") :] for k in metrics if k.startswith("grad_norm_")]  # each phase logs its norm
    return {p: metrics[f"loss_{p}"] for p in phases if f"loss_{p}" in metrics}
