"""jaxdiff: text-to-image diffusion models (Stable Diffusion family) as pure, sharded JAX functions."""

__version__ = "0.1.0"

# Loaded on first use so `import jaxdiff` (and `jaxdiff --help`) stays fast and does not import jax.
_LAZY = {
    "load_model": "jaxdiff.api",
    "init_model": "jaxdiff.api",
    "load_components": "jaxdiff.api",
    "Model": "jaxdiff.models.model",
    "load_pipeline": "jaxdiff.sampling.pipeline",
    "Pipeline": "jaxdiff.sampling.pipeline",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxdiff' has no attribute {name!r}")
