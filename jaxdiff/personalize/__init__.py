"""Personalization: placeholder tokens, LoRA, Textual Inversion and DreamBooth-LoRA (`jaxdiff personalize`)."""

from __future__ import annotations


def apply(pipe, path, multiplier: float = 1.0):
    """`pipe` with a personalize run's token and LoRA added (see `jaxdiff.personalize.run.apply`)."""
    from jaxdiff.personalize.run import apply as _apply

    return _apply(pipe, path, multiplier)
