"""The platform ("cpu", "gpu", "tpu") a program is compiled for: it picks the models' attention and convolutions."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

# JAX names GPU backends "gpu" (devices and default_backend), plugins sometimes "cuda" / "rocm".
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}


def resolve(platform: str | None = None) -> str:
    """`platform` normalised ("cuda" -> "gpu"), or the host's default backend when None.

    The default backend is only the right answer when the program runs on the host's default devices; code that
    compiles for other devices (a mesh of TPU topology devices on a CPU host) must say so (`of(mesh)`).
    """
    name = jax.default_backend() if platform is None else str(platform).lower()
    return _ALIASES.get(name, name)


def of(where: Any) -> str:
    """The platform of a Mesh, a Sharding, a jax.Array, a Device or a sequence of devices (all of one platform)."""
    if isinstance(where, jax.sharding.Mesh):
        devices = list(where.devices.flat)
    elif isinstance(where, jax.sharding.Sharding):
        devices = list(where.device_set)
    elif isinstance(where, jax.Array):
        devices = list(where.devices())
    elif isinstance(where, jax.Device):
        devices = [where]
    else:
        devices = list(np.asarray(where, dtype=object).flat)
    if not devices:
        raise ValueError("no devices to take a platform from")
    found = sorted({resolve(d.platform) for d in devices})
    if len(found) != 1:
        raise ValueError(f"devices of several platforms {found}: a program compiles for one")
    return found[0]
