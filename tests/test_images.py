"""jaxdiff/images.py: labelled grids and the scatter plot people look at."""

import numpy as np

from jaxdiff.images import labeled_rows, make_grid, scatter_plot


def test_a_short_row_is_as_wide_as_a_full_one_and_white_where_it_has_no_image():
    full = np.zeros((4, 8, 8, 3), np.float32)
    image = labeled_rows([("full", full), ("one", full[:1]), ("none", full[:0])], min_cell=16, label_width=40)
    assert image.shape[1] == 40 + make_grid(full, columns=4, min_cell=16).shape[1]
    one = image[image.shape[0] // 3 : 2 * image.shape[0] // 3, 40:]
    assert (one[:, one.shape[1] // 2 :] == 255).all()  # the missing cells are white
    assert (one[:, : one.shape[1] // 4] != 255).any()  # the one image is there


def test_scatter_plot_draws_each_group_and_the_ring():
    points = [(0.2, 0.9, "a", False), (0.8, 0.5, "b", True)]
    image = scatter_plot(points, "x", "y", "t")
    assert image.dtype == np.uint8 and image.shape == (480, 720, 3)
    assert (image != 255).any(axis=-1).sum() > 500
    plain = scatter_plot([(0.2, 0.9, "a", False), (0.8, 0.5, "b", False)], "x", "y", "t")
    assert (plain != image).any()  # the ring is drawn
