"""The parity bound used by every reference test: |a - ref| <= rel * max(1, max|ref|)."""

import numpy as np


def assert_parity(actual, reference, rel=1e-4, what="output"):
    """|actual - reference| <= rel * max(1, max|reference|) elementwise (the foundation's parity bound)."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert actual.shape == reference.shape, f"{what}: shape {actual.shape} != reference {reference.shape}"
    bound = rel * max(1.0, float(np.max(np.abs(reference))))
    err = float(np.max(np.abs(actual - reference)))
    assert err <= bound, f"{what}: max abs error {err:.3g} > bound {bound:.3g}"


def golden_tool():
    """tools/make_metric_goldens.py as a module: its numpy-only helpers draw the weights the goldens were made with."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "make_metric_goldens.py")
    spec = importlib.util.spec_from_file_location("make_metric_goldens", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
