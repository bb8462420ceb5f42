"""Deterministic, resumable global batches from a random-access source (TFDS data source), sharded per process."""

from __future__ import annotations

import importlib
import queue
import threading
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import NamedSharding


class RandomAccessSource(Protocol):
    """What `tfds.builder(...).as_data_source(split)` (or any list-like) provides: records as dicts of arrays."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class SyntheticSource:
    """Learnable stand-in data: per record a class-dependent Gaussian blob pattern as `latents` [S, S, C] and the
    class's embedding (plus a little noise) as `encoder_hidden_states` [L, D]; deterministic in (seed, index)."""

    def __init__(self, num_records=256, size=8, channels=4, context_length=4, context_dim=32, classes=8, seed=0):
        self.num_records, self.size, self.channels = num_records, size, channels
        self.context_length, self.context_dim, self.classes, self.seed = context_length, context_dim, classes, seed
        rng = np.random.default_rng([seed, 1 << 20])
        self.embeddings = rng.standard_normal((classes, context_length, context_dim)).astype(np.float32)
        self.centres = rng.uniform(0.2, 0.8, (classes, 2)) * size
        self.colours = rng.uniform(-1.0, 1.0, (classes, channels)).astype(np.float32)

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.num_records:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, int(index)])
        k = int(rng.integers(self.classes))
        yy, xx = np.mgrid[0 : self.size, 0 : self.size].astype(np.float32)
        cy, cx = self.centres[k] + rng.normal(0, 0.5, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (self.size / 6) ** 2))[..., None]
        latents = blob * self.colours[k] + 0.05 * rng.standard_normal((self.size, self.size, self.channels))
        context = self.embeddings[k] + 0.05 * rng.standard_normal((self.context_length, self.context_dim))
        return {
            "latents": latents.astype(np.float32),
            "encoder_hidden_states": context.astype(np.float32),
            "label": np.int32(k),
        }


def make_source(data_config) -> RandomAccessSource:
    """The record source a config names: "synthetic", "tfds" (`as_data_source`), or "package.module:function"."""
    source = data_config.source
    if source == "synthetic":
        return SyntheticSource(**dict(data_config.synthetic), seed=data_config.seed)
    if source == "tfds":
        import tensorflow_datasets as tfds

        if not data_config.name:
            raise ValueError("data.source='tfds' needs data.name (a registered TFDS dataset)")
        builder = tfds.builder(data_config.name, data_dir=data_config.data_dir or None)
        return builder.as_data_source(split=data_config.split)
    if ":" in source:
        module, _, attr = source.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        return factory(data_config) if callable(factory) else factory
    raise ValueError(f"data.source={source!r}: use 'synthetic', 'tfds' or 'package.module:function'")


def local_rows(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
    """The contiguous rows [start, stop) of a global batch that this process's devices hold."""
    spans = set()
    for index in sharding.addressable_devices_indices_map((global_batch,)).values():
        rows = index[0]
        spans.add((rows.start or 0, global_batch if rows.stop is None else rows.stop))
    start, stop = min(s for s, _ in spans), max(e for _, e in spans)
    covered = np.zeros(global_batch, bool)
    for s, e in spans:
        covered[s:e] = True
    if not covered[start:stop].all():
        raise ValueError(f"this process's devices hold non-contiguous batch rows {sorted(spans)}")
    return start, stop


class BatchIterator:
    """Global batches [G, ...] as jax.Arrays sharded by `sharding` on the batch dimension.

    Epoch e visits the records in the order `default_rng([seed, e]).permutation(len(source))` (or in order
    when not shuffling), G at a time, dropping the remainder. Each process reads only the records of its own
    rows, so the global batch does not depend on the number of processes. `state()`/`restore()` give and take
    the position as a small JSON-able dict, saved with each checkpoint.
    """

    def __init__(
        self, source, global_batch: int, sharding: NamedSharding, *, seed=0, shuffle=True, keys=(), prefetch=2
    ):
        self.source, self.global_batch, self.sharding = source, int(global_batch), sharding
        self.seed, self.shuffle, self.keys, self.prefetch = int(seed), bool(shuffle), tuple(keys), int(prefetch)
        self.num_records = len(source)
        self.batches_per_epoch = self.num_records // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"the data source has {self.num_records} records, fewer than one batch of {global_batch}")
        self.rows = local_rows(sharding, self.global_batch)
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = None, None
        self._thread = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # -- position -------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_records": self.num_records,
            "global_batch_size": self.global_batch,
        }

    def restore(self, state: dict) -> None:
        for key in ("seed", "shuffle", "num_records", "global_batch_size"):
            mine = self.state()[key]
            if key in state and state[key] != mine:
                raise ValueError(f"the checkpoint's data iterator has {key}={state[key]!r}, this run has {mine!r}")
        self._halt()
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def batches_consumed(self) -> int:
        return self.epoch * self.batches_per_epoch + self.position

    # -- reading ----------------------------------------------------------------------------------------------
    def _indices(self, epoch: int, position: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = self.num_records
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = epoch
        start = position * self.global_batch
        return self._order[start + self.rows[0] : start + self.rows[1]]

    def _read(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        records = [self.source[int(i)] for i in self._indices(epoch, position)]
        keys = self.keys or [k for k, v in records[0].items() if np.asarray(v).dtype.kind in "biuf"]
        missing = [k for k in keys if k not in records[0]]
        if missing:
            raise KeyError(f"data records have no feature(s) {missing}; they have {sorted(records[0])}")
        return {k: np.stack([np.asarray(r[k]) for r in records]) for k in keys}

    def _producer(self, epoch: int, position: int) -> None:
        while not self._stop.is_set():
            try:
                item = self._read(epoch, position)
            except Exception as e:  # handed to the consumer, raised there
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, Exception):
                return
            position += 1
            if position == self.batches_per_epoch:
                epoch, position = epoch + 1, 0

    def _halt(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread, self._queue = None, None
            self._stop = threading.Event()

    def _next_local(self) -> dict[str, np.ndarray]:
        if self.prefetch <= 0:
            return self._read(self.epoch, self.position)
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._producer, args=(self.epoch, self.position), daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, Exception):
            self._halt()
            raise item
        return item

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        local = self._next_local()
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return {
            k: jax.make_array_from_process_local_data(self.sharding, v, (self.global_batch, *v.shape[1:]))
            for k, v in local.items()
        }

    def close(self) -> None:
        self._halt()
