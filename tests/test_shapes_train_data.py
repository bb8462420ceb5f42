"""tools/train_shapes.py --generate-data: a split rendered directly has the TFDS builder's size, or the first
--num-examples of it, and the same examples as the builder."""

import numpy as np

from jaxdiff.data.shapes_tfds import ShapesConfig, make_example
from jaxdiff.train.shapes.common import _load_split


def test_a_rendered_split_has_the_builders_size_unless_told_fewer():
    full = _load_split("test", None, generate=True)  # used to fail: range(None)
    assert len(full["images"]) == ShapesConfig(name="default").num_test
    capped = _load_split("test", 10**6, generate=True)  # never past the split's end
    assert len(capped["images"]) == len(full["images"])
    few = _load_split("test", 3, generate=True)
    assert len(few["images"]) == 3
    np.testing.assert_array_equal(few["images"][2], make_example("test", 2, 32)["image"])
    np.testing.assert_array_equal(full["images"][:3], few["images"])
