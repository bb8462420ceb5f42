"""Sampling: schedulers as pure step functions, compiled denoising loops and pipelines."""

from jaxdiff.sampling.schedulers import DIFFUSERS_CLASSES, SCHEDULERS, make_scheduler

__all__ = ["SCHEDULERS", "DIFFUSERS_CLASSES", "make_scheduler"]
