"""Load PyTorch `.bin`/`.pt`/`.ckpt` state dicts safely: only through `torch.load(weights_only=True)`."""

from __future__ import annotations

import os
import pickle
import zipfile

import ml_dtypes
import numpy as np

from jaxdiff.convert.safetensors_io import CorruptCheckpointError
from jaxdiff.errors import UserError

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# Phrases torch uses when its restricted unpickler refuses a global (i.e. the pickle would run code).
_REFUSED = ("weights only load failed", "unsupported global", "unsupported operand")


class UnsafeCheckpointError(UserError):
    """A pickle that would import or call arbitrary code: refused, never executed."""

    def __init__(self, path, detail: str = ""):
        self.path = str(path)
        detail = f" ({detail})" if detail else ""
        super().__init__(
            f"{path}: refused for safety: this pickle would run arbitrary code when loaded{detail}; "
            "only plain tensor state dicts are accepted (convert it with a trusted tool to .safetensors)"
        )


def _import_torch():
    try:
        import torch
    except ImportError:
        raise ImportError(
            "reading PyTorch .bin/.pt/.ckpt checkpoints needs torch: pip install jaxdiff[torch] "
            "(.safetensors checkpoints load without it)",
            name="torch",
        ) from None
    return torch


def load_torch_state_dict(path: str | os.PathLike, upcast: bool = True) -> dict[str, np.ndarray]:
    """A flat {key: numpy array} from a PyTorch checkpoint; floating tensors become float32 when `upcast`.

    A `state_dict` entry (Lightning/LDM `.ckpt` files) is unwrapped; non-tensor entries are skipped.
    Without `upcast`, stored dtypes are kept (bfloat16 as ml_dtypes.bfloat16).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    torch = _import_torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
        message = str(e)
        first_line = message.strip().splitlines()[0] if message.strip() else type(e).__name__
        if any(phrase in message.lower() for phrase in _REFUSED):
            # The unpickler names the offending global (e.g. `posix.system`) near the end of its message.
            detail = next((line.strip() for line in message.splitlines() if "GLOBAL" in line or "global" in line), "")
            raise UnsafeCheckpointError(path, detail[:200]) from None
        raise CorruptCheckpointError(path, f"torch.load failed ({type(e).__name__}: {first_line[:160]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(path, f"expected a state dict (names -> tensors), found {type(obj).__name__}")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        value = value.detach().contiguous()
        if value.is_floating_point() and upcast:
            value = value.float()  # bf16/fp16 upcast exactly
        if value.dtype == torch.bfloat16:  # torch has no numpy bridge for bf16: reinterpret the bits
            state[str(key)] = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            state[str(key)] = value.numpy()
    return state
