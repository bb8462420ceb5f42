"""Data: deterministic epoch-seeded order, resumable iterator state, per-process rows, a TFDS data source."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding, PartitionSpec

from jaxdiff import sharding
from jaxdiff.train import config as config_lib
from jaxdiff.train import data as data_lib


class _Indexed:
    """Records whose only feature is their own index."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"index": np.int32(i), "name": b"text is dropped"}


def _iterator(n=20, batch=4, devices=1, **kw):
    mesh = sharding.make_mesh({"data": devices}, jax.devices()[:devices])
    return data_lib.BatchIterator(_Indexed(n), batch, NamedSharding(mesh, PartitionSpec("data")), **kw)


def _indices(it, steps):
    return [np.asarray(next(it)["index"]).tolist() for _ in range(steps)]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_each_epoch_is_a_seeded_permutation_and_the_remainder_is_dropped(prefetch):
    it = _iterator(n=22, batch=4, seed=7, prefetch=prefetch)
    epochs = [sum(_indices(it, 5), []) for _ in range(2)]
    for epoch, seen in enumerate(epochs):
        assert len(set(seen)) == 20 and set(seen) <= set(range(22))
        assert seen == np.random.default_rng([7, epoch]).permutation(22)[:20].tolist()
    assert epochs[0] != epochs[1]
    assert it.state()["epoch"] == 2 and it.state()["position"] == 0
    assert _indices(_iterator(n=22, batch=4, seed=7), 5) == [epochs[0][i : i + 4] for i in range(0, 20, 4)]
    it.close()


def test_iterator_state_round_trips_and_resumes_mid_epoch():
    it = _iterator(seed=3)
    _indices(it, 7)  # one epoch is 5 batches: now epoch 1, position 2
    state = it.state()
    assert (state["epoch"], state["position"]) == (1, 2)
    expected = _indices(it, 4)
    fresh = _iterator(seed=3)
    fresh.restore(state)
    assert _indices(fresh, 4) == expected
    with pytest.raises(ValueError, match="seed"):
        _iterator(seed=4).restore(state)
    for x in (it, fresh):
        x.close()


def test_a_process_reads_only_the_rows_its_devices_hold():
    it = _iterator(batch=8, devices=8, shuffle=False, prefetch=0)
    assert it.rows == (0, 8)
    batch = next(it)["index"]
    assert batch.shape == (8,) and len(batch.sharding.device_set) == 8
    # As the second of two processes would: only rows 4..7 of each global batch are read.
    it.rows = (4, 8)
    assert it._read(0, 1)["index"].tolist() == [12, 13, 14, 15]
    mesh = sharding.make_mesh({"data": 4, "tensor": 2})
    assert data_lib.local_rows(NamedSharding(mesh, PartitionSpec("data")), 8) == (0, 8)


def test_numeric_features_only_unless_named():
    batch = next(_iterator(prefetch=0))
    assert set(batch) == {"index"}
    with pytest.raises(KeyError, match="missing|no feature"):
        next(_iterator(prefetch=0, keys=("latents",)))


class TinyLatents(tfds.core.GeneratorBasedBuilder):
    """A registered TFDS builder (array_record, no TensorFlow) with cached-latent features."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "latents": tfds.features.Tensor(shape=(8, 8, 4), dtype=np.float32),
                    "encoder_hidden_states": tfds.features.Tensor(shape=(4, 32), dtype=np.float32),
                    "caption": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(40)}

    def _generate_examples(self, n):
        for i in range(n):
            rng = np.random.default_rng(i)
            yield (
                i,
                {
                    "latents": np.full((8, 8, 4), i, np.float32),
                    "encoder_hidden_states": rng.standard_normal((4, 32)).astype(np.float32),
                    "caption": f"record {i}",
                },
            )


def test_tfds_data_source_gives_sharded_global_batches(tmp_path):
    TinyLatents(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = config_lib.default_config()
    config.data.source, config.data.name, config.data.data_dir = "tfds", "tiny_latents", str(tmp_path)
    source = data_lib.make_source(config.data)
    assert len(source) == 40
    mesh = sharding.make_mesh({"data": 8})
    it = data_lib.BatchIterator(source, 8, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))), seed=1)
    batch = next(it)
    assert set(batch) == {"latents", "encoder_hidden_states"}
    assert batch["latents"].shape == (8, 8, 8, 4) and len(batch["latents"].addressable_shards) == 8
    order = np.random.default_rng([1, 0]).permutation(40)[:8]
    expected = [source[int(j)]["latents"][0, 0, 0] for j in order]  # TFDS stores the records shuffled
    np.testing.assert_array_equal(np.asarray(batch["latents"])[:, 0, 0, 0], expected)
    assert sorted(source[j]["latents"][0, 0, 0] for j in range(40)) == list(range(40))
    it.close()
