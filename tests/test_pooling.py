import pytest
import torch
from conftest import loop_spp
from hypothesis import given, settings
from hypothesis import strategies as st

from spp_extract import SpatialPyramidPooling, spatial_pyramid_pool, spp_dim

levels_strategy = st.lists(st.integers(1, 7), min_size=1, max_size=4, unique=True).map(tuple)


@settings(max_examples=150, deadline=None)
@given(
    h=st.integers(1, 64),
    w=st.integers(1, 64),
    channels=st.integers(1, 5),
    levels=levels_strategy,
    mode=st.sampled_from(["max", "avg"]),
    seed=st.integers(0, 2**16),
)
def test_matches_plain_loop_for_every_size(h, w, channels, levels, mode, seed):
    torch.manual_seed(seed)
    x = torch.randn(2, channels, h, w, dtype=torch.float64)
    got = spatial_pyramid_pool(x, levels, mode)
    assert got.shape == (2, spp_dim(channels, levels))
    for n in range(2):
        torch.testing.assert_close(got[n], loop_spp(x[n], levels, mode), rtol=1e-12, atol=1e-12)


def test_length_is_the_same_for_every_size_including_1x1():
    pool = SpatialPyramidPooling((6, 3, 2, 1))
    dims = {
        pool(torch.randn(1, 8, h, w)).shape[1]
        for h, w in [(1, 1), (1, 40), (3, 2), (11, 4), (64, 64)]
    }
    assert dims == {8 * (36 + 9 + 4 + 1)}


def test_eleven_columns_four_bins_cover_every_column():
    # The paper's text formula (window ceil(11/4)=3, stride floor(11/4)=2) drops columns 9-10.
    x = torch.zeros(1, 1, 1, 11)
    x[..., 10] = 5.0
    assert spatial_pyramid_pool(x, (4,), "max")[0, -1] == 5.0


def test_1x1_map_is_replicated_into_every_bin():
    x = torch.tensor([[[[3.0]], [[-2.0]]]])  # (1, 2, 1, 1)
    out = spatial_pyramid_pool(x, (2, 1), "max")
    assert out.tolist() == [[3.0] * 4 + [-2.0] * 4 + [3.0, -2.0]]


def test_layout_is_level_blocks_flattened_channel_major():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    out = spatial_pyramid_pool(x, (2, 1), "max")[0]
    # level 2: channel 0 bins (row-major), then channel 1; then level 1: channel 0, channel 1
    assert out.tolist() == [5, 7, 13, 15, 21, 23, 29, 31, 15, 31]


def test_module_shows_settings_and_rejects_bad_mode():
    assert "levels=(4, 2, 1), mode='avg'" in repr(SpatialPyramidPooling((4, 2, 1), "avg"))
    with pytest.raises(ValueError, match="unknown pooling mode"):
        spatial_pyramid_pool(torch.zeros(1, 1, 2, 2), (1,), "median")  # type: ignore[arg-type]
