"""The trainer shared by every objective: sharded train state, compiled step, orbax checkpoints, data, metrics."""

from jaxdiff.train.loop import restore, setup, train

__all__ = ["restore", "setup", "train"]
