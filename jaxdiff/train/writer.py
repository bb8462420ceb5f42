"""The training log writer: a JSONL log, TensorBoard event files (pure Python, no TensorFlow), a tqdm bar, FLOPs."""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------------------- TensorBoard


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord framing uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        bits = n & 0x7F
        n >>= 7
        if n:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def event_bytes(wall_time: float, step: int, *, file_version: str | None = None, scalars: dict | None = None) -> bytes:
    """A serialised tensorflow.Event: wall_time=1 (double), step=2 (int64), file_version=3, summary=5 whose
    Summary.value=1 holds Value{tag=1, simple_value=2 (float)}."""
    msg = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(int(step))
    if file_version is not None:
        msg += _bytes_field(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", float(value)))
            for tag, value in scalars.items()
        )
        msg += _bytes_field(5, summary)
    return msg


def record_bytes(data: bytes) -> bytes:
    """TFRecord framing: length, masked CRC of the length, data, masked CRC of the data."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


class EventFileWriter:
    """Scalars to `logdir/events.out.tfevents.<time>.<host>`, readable by TensorBoard."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
        self._file = open(self.path, "ab")
        self._file.write(record_bytes(event_bytes(time.time(), 0, file_version="brain.Event:2")))
        self._file.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._file.write(record_bytes(event_bytes(time.time(), step, scalars=values)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# ----------------------------------------------------------------------------------------------- FLOPs


def flops_of(compiled) -> float | None:
    """FLOPs of one call of an AOT-compiled function per XLA's cost analysis (per device for SPMD programs)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


# --------------------------------------------------------------------------------------------- writer


def truncate_jsonl(workdir: str, step: int) -> None:
    """Cut `workdir/metrics.jsonl` back to the rows of steps <= `step`, dropping a torn last row (a kill mid-write):
    a resumed run then appends without duplicates. Atomic: the file is replaced, never rewritten in place."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.read().split("\n")
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # empty or torn
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            kept.append(line)
    if len(kept) == len([x for x in lines if x]):
        return
    from jaxdiff import fileio

    fileio.atomic_write_text(path, "".join(x + "\n" for x in kept))


class MetricsWriter:
    """JSONL (workdir/metrics.jsonl) + TensorBoard (workdir/tensorboard) + a tqdm bar; only process 0 writes.

    `step_flops`: FLOPs of one step summed over devices (for TFLOP/s); `images_per_step`: the global batch.
    """

    def __init__(
        self,
        workdir: str,
        *,
        total_steps: int,
        initial_step: int,
        images_per_step: int,
        step_flops: float | None = None,
        tensorboard: bool = True,
        progress: bool = True,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.images_per_step, self.step_flops = images_per_step, step_flops
        self._last_time, self._last_step = time.perf_counter(), initial_step
        self._jsonl = self._events = self._bar = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            self._events = EventFileWriter(os.path.join(workdir, "tensorboard"))
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True, smoothing=0.1)

    def reset_timer(self, step: int) -> None:
        """Start timing throughput from `step` (e.g. after compilation)."""
        self._last_time, self._last_step = time.perf_counter(), step

    def advance(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def write(self, step: int, scalars: dict[str, Any], *, timed: bool = True) -> dict:
        """Log `scalars` (plus throughput since the last timed write) at `step`; returns the record."""
        record = {k: _scalar(v) for k, v in scalars.items()}
        now = time.perf_counter()
        if timed and step > self._last_step:
            seconds = (now - self._last_time) / (step - self._last_step)
            record["steps_per_s"] = 1.0 / seconds
            record["images_per_s"] = self.images_per_step / seconds
            if self.step_flops:
                record["tflops_per_s"] = self.step_flops / seconds / 1e12
            self._last_time, self._last_step = now, step
        if self.enabled:
            self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **record}) + "\n")
            self._jsonl.flush()
            if self._events is not None:
                self._events.scalars(step, {k: v for k, v in record.items() if isinstance(v, (int, float))})
        return record

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        for f in (self._jsonl, self._events, self._bar):
            if f is not None:
                f.close()


def _scalar(v):
    a = np.asarray(v)
    if a.dtype == bool:
        return bool(a)
    if a.dtype.kind in "iu":
        return int(a)
    return float(a)
