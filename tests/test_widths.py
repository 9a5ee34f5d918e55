import pytest

from sliceserve.errors import SliceserveError
from sliceserve.slicing.slicer import kept_width


@pytest.mark.parametrize(
    "width, sparsity, expected",
    [
        (4096, 0.25, 3072),
        (4096, 0.3, 2864),
        (576, 0.25, 432),
        (2560, 0.8, 512),
        (960, 0.55, 432),
        (80, 0.9, 8),
        (577, 0.0, 577),
        (4096, 0.0, 4096),
    ],
)
def test_kept_width_rounds_down_to_multiple_without_float_error(width, sparsity, expected):
    assert kept_width(width, sparsity, 8) == expected


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5])
def test_sparsity_outside_unit_interval_is_refused(sparsity):
    with pytest.raises(SliceserveError, match="sparsity"):
        kept_width(4096, sparsity, 8)


def test_sparsity_that_leaves_nothing_is_refused():
    with pytest.raises(SliceserveError, match="no width"):
        kept_width(16, 0.95, 8)
