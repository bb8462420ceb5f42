"""Diffusion schedulers as pure JAX step functions, one module per family."""

from jaxdiff.errors import UserError
from jaxdiff.sampling.schedulers.common import add_noise, velocity
from jaxdiff.sampling.schedulers.ddim import DDIM
from jaxdiff.sampling.schedulers.ddpm import DDPM
from jaxdiff.sampling.schedulers.dpm_solver import DPMSolverPP
from jaxdiff.sampling.schedulers.euler import EulerDiscrete
from jaxdiff.sampling.schedulers.flow_euler import FlowEuler
from jaxdiff.sampling.schedulers.lcm import LCM
from jaxdiff.sampling.schedulers.pndm import PNDM

SCHEDULERS = {
    "ddpm": DDPM,
    "ddim": DDIM,
    "euler": EulerDiscrete,
    "dpm++2m": DPMSolverPP,
    "pndm": PNDM,
    "flow_euler": FlowEuler,
    "lcm": LCM,
}

# diffusers class names accepted as aliases
DIFFUSERS_CLASSES = {
    "DDPMScheduler": "ddpm",
    "DDIMScheduler": "ddim",
    "EulerDiscreteScheduler": "euler",
    "DPMSolverMultistepScheduler": "dpm++2m",
    "PNDMScheduler": "pndm",
    "FlowMatchEulerDiscreteScheduler": "flow_euler",
    "LCMScheduler": "lcm",
}


def make_scheduler(name: str, config: dict | None = None, **options):
    """A scheduler from a diffusers scheduler_config.json dict (missing keys take diffusers' defaults, keys of
    other schedulers are ignored, unsupported values raise ValueError naming the key). `options`: ddim's eta."""
    key = DIFFUSERS_CLASSES.get(name, name)
    if key not in SCHEDULERS:
        raise UserError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    return SCHEDULERS[key](config, **options)


__all__ = [
    "SCHEDULERS",
    "DIFFUSERS_CLASSES",
    "make_scheduler",
    "add_noise",
    "velocity",
    "DDPM",
    "DDIM",
    "EulerDiscrete",
    "DPMSolverPP",
    "PNDM",
    "FlowEuler",
    "LCM",
]
