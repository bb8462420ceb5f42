"""The data-driven erasure objectives (TRCE stage 2, DoCo, Concept Ablation) on a tiny UNet: finite loss, aux and
gradients (see test_erase_objectives.py)."""

import pytest
from test_erase_objectives import check_objective, tiny_unet


@pytest.fixture(scope="module")
def tiny():
    return tiny_unet()


@pytest.mark.parametrize("name", ["trce", "doco", "ablation"])
def test_objective_gives_a_finite_scalar_and_finite_gradients(tiny, name):
    check_objective(tiny, name)
