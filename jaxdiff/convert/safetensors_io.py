"""Read and write safetensors files with numpy only (memory-mapped, validated; bfloat16 via ml_dtypes)."""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

from jaxdiff import fileio
from jaxdiff.errors import UserError

# safetensors dtype tag <-> numpy dtype (all little-endian, as the format prescribes).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}
_TAGS = {dtype: tag for tag, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit; guards against reading garbage lengths


def dtype_tag(dtype) -> str:
    """The safetensors tag ("F32", "BF16", ...) of a numpy dtype."""
    dtype = np.dtype(dtype)
    tag = _TAGS.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)
    if tag is None:
        raise ValueError(f"dtype {dtype} has no safetensors equivalent (supported: {', '.join(DTYPES)})")
    return tag


class CorruptCheckpointError(UserError):
    """A checkpoint file that cannot be parsed: truncated, not the format it claims, or inconsistent."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: corrupt or truncated checkpoint: {reason}")


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A validated safetensors file; tensors are read-only views of a memory map, read on access."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CorruptCheckpointError(self.path, f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER or 8 + n > size:
                raise CorruptCheckpointError(self.path, f"header length {n} exceeds the file size {size}")
            raw = f.read(n)
            # mmap cannot map an empty region; a file with only empty tensors has nothing to map.
            self._buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else b""
        self._start = 8 + n
        self.header, self.metadata = _parse_header(self.path, raw, size - self._start)

    def __getitem__(self, key: str) -> np.ndarray:
        info = self.header[key]
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        count = (end - begin) // dtype.itemsize
        if count == 0:
            return np.empty(info["shape"], dtype)
        array = np.frombuffer(self._buffer, dtype=dtype, count=count, offset=self._start + begin)
        return array.reshape(info["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self.header)

    def __len__(self) -> int:
        return len(self.header)

    def dtype(self, key: str) -> np.dtype:
        return DTYPES[self.header[key]["dtype"]]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])


def _parse_header(path: str, raw: bytes, data_size: int) -> tuple[dict, dict]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    spans = []
    for key, info in header.items():
        try:
            tag, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in (*shape, begin, end)):
                raise TypeError
        except (TypeError, KeyError, ValueError):
            raise CorruptCheckpointError(path, f"tensor {key!r} has a malformed header entry {info!r}") from None
        if tag not in DTYPES:
            supported = ", ".join(DTYPES)
            raise CorruptCheckpointError(path, f"tensor {key!r} has unsupported dtype {tag!r} (supported: {supported})")
        expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[tag].itemsize
        if not 0 <= begin <= end or end - begin != expected:
            raise CorruptCheckpointError(
                path, f"tensor {key!r} spans bytes [{begin}, {end}) but {tag}{list(shape)} needs {expected} bytes"
            )
        if end > data_size:
            reason = f"tensor {key!r} ends at byte {end}, past the end of the data ({data_size} bytes)"
            raise CorruptCheckpointError(path, reason)
        spans.append((begin, end, key))
    # The format requires tensors to tile the data section exactly: overlaps or gaps mean a damaged file.
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            raise CorruptCheckpointError(path, f"tensor {key!r} starts at byte {begin}, expected {position}")
        position = end
    if position != data_size:
        raise CorruptCheckpointError(path, f"tensors cover {position} bytes but the data section has {data_size}")
    return header, metadata


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """The validated tensor index {name: {"dtype", "shape", "data_offsets"}} and the `__metadata__` dict."""
    f = SafetensorsFile(path)
    return f.header, f.metadata


def load_safetensors(path: str | os.PathLike, copy: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a file as numpy arrays (read-only memory-map views unless `copy`)."""
    f = SafetensorsFile(path)
    return {k: np.array(f[k]) if copy else f[k] for k in f}


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Write `tensors` atomically and durably (`fileio.atomic_file`: a temporary file, fsync, rename)."""
    path = os.fspath(path)
    prepared = []
    for key, value in tensors.items():
        array = np.asarray(value)
        try:
            tag = dtype_tag(array.dtype)
        except ValueError as e:
            raise ValueError(f"cannot store tensor {key!r}: {e}") from None
        prepared.append((key, tag, np.asarray(array, dtype=DTYPES[tag], order="C")))
    # Widest dtypes first, as the reference writer does, so every tensor stays aligned to its item size.
    prepared.sort(key=lambda item: (-item[2].dtype.itemsize, item[0]))
    arrays, header, offset = [], {}, 0
    for key, tag, array in prepared:
        header[key] = {"dtype": tag, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data section starts 8-byte aligned, as the reference writer does
    with fileio.atomic_file(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for array in arrays:
            f.write(array.reshape(-1).view(np.uint8).data)
