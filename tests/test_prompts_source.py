"""The prompts-only data source: captions without images, tokenized like the model's, through the trainer's batches."""

import jax
import ml_collections as mlc
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxdiff import sharding
from jaxdiff.data import prompts as prompts_lib
from jaxdiff.data.shapes_tfds import make_example
from jaxdiff.errors import UserError
from jaxdiff.sampling import text
from jaxdiff.sampling.pipeline import BUILTIN
from jaxdiff.train import data as data_lib


def _config(**options):
    return mlc.ConfigDict(
        dict(source="jaxdiff.data.prompts:prompts", options=options, tokenizer="", seed=0, split="train")
    )


def test_a_prompt_file_gives_the_tokenizer_s_ids_in_order(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# erase these\na red circle\n\na blue square on the left\n")
    source = data_lib.make_source(_config(file=str(path)))
    tokenizer = text.load_tokenizer(BUILTIN["shapes"] / "tokenizer")
    assert len(source) == 2
    expected = text.tokenize(tokenizer, ["a red circle", "a blue square on the left"])
    np.testing.assert_array_equal(source[0]["input_ids"], expected[0])
    np.testing.assert_array_equal(source[1]["input_ids"], expected[1])
    assert int(source[1]["prompt_index"]) == 1


def test_shapes_captions_are_the_examples_captions_without_rendering():
    captions = prompts_lib.shapes_captions("validation", 5, "heldout_caption")
    assert captions == [make_example("validation", i, 32)["heldout_caption"] for i in range(5)]


def test_prompts_batch_through_the_trainer_iterator_and_resume():
    source = data_lib.make_source(_config(shapes="train", num_records=12))
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    it = data_lib.BatchIterator(source, 4, NamedSharding(mesh, PartitionSpec("data")), seed=3, prefetch=0)
    first = [next(it) for _ in range(2)]
    assert set(first[0]) == {"input_ids", "prompt_index"} and first[0]["input_ids"].dtype == np.int32
    saved = it.state()
    third = next(it)
    again = data_lib.BatchIterator(source, 4, NamedSharding(mesh, PartitionSpec("data")), seed=3, prefetch=0)
    again.restore(saved)
    np.testing.assert_array_equal(next(again)["prompt_index"], third["prompt_index"])


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "exactly one of file"),
        ({"shapes": "train"}, "num_records > 0"),
        ({"file": "/nonexistent/prompts.txt"}, "no such file"),
        ({"shapes": "train", "num_records": 2, "colour": 1}, "unknown keys"),
    ],
)
def test_bad_prompt_options_are_clear_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        data_lib.make_source(_config(**options))
