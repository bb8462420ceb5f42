"""orbax checkpoints of the train state: async, keep-N, save on SIGTERM, restore onto any mesh, never non-finite."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxdiff import fileio, platforms

ITEMS = ("state", "data", "meta")


class NonFiniteCheckpointError(FloatingPointError):
    """Refusal to write a checkpoint whose state holds a NaN or an infinity."""


@jax.jit
def _finite_flags(tree) -> jax.Array:
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.ones((0,), bool)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths of the floating-point leaves of `tree` holding a NaN or an infinity."""
    from jaxdiff.train.state import path_str

    flags = np.asarray(jax.device_get(_finite_flags(tree)))
    paths = [path_str(p) for p, x in jax.tree_util.tree_leaves_with_path(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return [p for p, ok in zip(paths, flags) if not ok]


class Checkpointer:
    """An orbax CheckpointManager over `directory/<step>/{state,data,meta}`.

    state: the TrainState pytree (StandardSave: every process writes its own shards, in the background when
    `async_save`); data: the data iterator's position (JSON); meta: small JSON facts (config, step).
    Partially written (uncommitted) steps, e.g. after a kill -9 mid-save, are ignored on restore.
    """

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, platform: str | None = None):
        self.directory = os.path.abspath(directory)
        # cleanup_tmp_directories: a writer killed mid-save leaves a `<step>.orbax-checkpoint-tmp-*` folder, never
        # committed; it is ignored by restore and removed here.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save, cleanup_tmp_directories=True
        )
        # Replica-parallel saving slices every replicated array per replica with small jitted programs (one
        # compile per shape: seconds on CPU for a UNet); keep orbax's choice on accelerators, turn it off on CPU.
        # `platform` is that of the devices holding the saved arrays (None: the host's default backend).
        array_handler = ocp.type_handlers.ArrayHandler(
            use_replica_parallel=False if platforms.resolve(platform) == "cpu" else None
        )
        th = ocp.type_handlers
        registry = th.create_type_handler_registry(
            (int, th.ScalarHandler()),
            (float, th.ScalarHandler()),
            (np.number, th.ScalarHandler()),
            (np.ndarray, th.NumpyHandler()),
            (jax.Array, array_handler),
            (str, th.StringHandler()),
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=ITEMS,
            options=options,
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
                "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        self._preempted = threading.Event()
        self._previous_handler = None
        self._unsynced: list[int] = []  # committed steps whose files are not fsync'd yet

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data: dict, meta: dict) -> None:
        """Save `state` at `step` (async unless configured otherwise); NonFiniteCheckpointError if any leaf is
        non-finite, in which case nothing is written."""
        self._sync_committed()
        bad = nonfinite_leaves(state)
        if bad:
            more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
            raise NonFiniteCheckpointError(
                f"refusing to write checkpoint {step}: non-finite values in {', '.join(bad[:5])}{more}"
            )
        self.manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                data=ocp.args.JsonSave(data),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self._unsynced.append(int(step))

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(state, data, meta) at `step` (latest when None). `abstract_state`: ShapeDtypeStructs with the target
        shardings of *this* run's mesh, which may differ from the mesh that saved."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)
                ),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.data, restored.meta

    def _sync_committed(self) -> None:
        """fsync the files and folders of the steps written so far (after their commit), so that a committed step
        survives a power loss, not only a killed process. An asynchronous save is waited for first; orbax waits for
        it anyway before it starts the next one."""
        if not self._unsynced:
            return
        self.manager.wait_until_finished()
        for step in self._unsynced:
            folder = os.path.join(self.directory, str(step))
            if os.path.isdir(folder):
                fileio.fsync_tree(folder)
        fileio.fsync_path(self.directory)
        self._unsynced = []

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._sync_committed()

    def close(self) -> None:
        self.wait()
        self.manager.close()
        self.uninstall_sigterm()

    # -- preemption -----------------------------------------------------------------------------------------
    def install_sigterm(self) -> None:
        """On SIGTERM (a preemption notice) ask the loop to save and exit at the next step boundary.

        Single process only: under jax.distributed, JAX's preemption sync service owns SIGTERM and tells every
        process the same step to stop at (`preempted`), without a device collective that could interleave
        with the train step's own.
        """
        if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
            return

        def handler(signum, frame):
            self._preempted.set()

        self._previous_handler = signal.signal(signal.SIGTERM, handler)

    def uninstall_sigterm(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def preempted(self, step: int) -> bool:
        """True once this process got SIGTERM, or (multi-host) when JAX's preemption sync service says so: all
        processes then agree on the step, so they save it together."""
        return self._preempted.is_set() or bool(self.manager.reached_preemption(int(step)))
