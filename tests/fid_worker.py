"""Under launch/local.sh: FID statistics of 12 fixed images, each process passing its own 6, written by process 0."""

import sys

import jax
import numpy as np


def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (12, 40, 48, 3), dtype=np.uint8)


def model():
    import jaxdiff

    return jaxdiff.init_model({"_class_name": "FIDInceptionV3"}, abstract=False, seed=0)


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
