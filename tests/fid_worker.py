"""Under launch/local.sh: FID statistics of 12 fixed images, each process passing its own 6, written by process 0."""

import sys

import jax
import numpy as np


def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (12, 40, 48, 3), dtype=np.uint8)


def model():
    """The FID Inception with weights drawn in numpy (no compiled init program: both processes and the test draw the
    same values in a second); BatchNorm variances and scales positive."""
    import jaxdiff

    model = jaxdiff.init_model({"_class_name": "FIDInceptionV3"}, abstract=True)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("var", "scale"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        if name == "kernel":
            return (rng.standard_normal(leaf.shape) * np.sqrt(1.0 / np.prod(leaf.shape[:-1]))).astype(np.float32)
        return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)

    model.params = jax.tree_util.tree_map_with_path(draw, model.params)
    return model


def main(out: str) -> None:
    from jaxdiff.metrics import fid
    from jaxdiff.sharding import make_mesh
    from jaxdiff.train import distributed

    distributed.initialize_distributed_from_env()
    assert jax.process_count() == 2 and jax.device_count() == 4
    mine = images()[jax.process_index() :: 2]
    mu, sigma, n = fid.statistics(mine, "pytorch-fid", model(), make_mesh({"data": 4}), batch_size=4, dims=64)
    if jax.process_index() == 0:
        np.savez(out, mu=mu, sigma=sigma, n=n)


if __name__ == "__main__":
    main(sys.argv[1])
