"""Image protection against diffusion mimicry: Diff-Protect's encoder-VJP PGD and its baselines (`jaxdiff protect`)."""

from __future__ import annotations

_EXPORTS = ("MODES", "ProtectConfig", "Target", "protect_images")  # the loop itself: jaxdiff.protect.pgd.pgd


def __getattr__(name):  # lazy: `jaxdiff --help` imports jaxdiff.protect.command without importing JAX
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module("jaxdiff.protect.pgd"), name)
    raise AttributeError(f"module 'jaxdiff.protect' has no attribute {name!r}")


__all__ = list(_EXPORTS)
