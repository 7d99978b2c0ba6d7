"""Planning from header sizes: windows, batches, rank shares."""

import itertools
import math
import random

import pytest

from spp_extract.planning import BUCKET, Planner, partition


def _sizes(n, seed=0):
    rng = random.Random(seed)
    sizes = [(rng.randint(1, 700), rng.randint(1, 700)) for _ in range(n)]
    sizes[3] = None  # an unreadable header
    return sizes


@pytest.mark.parametrize("padded", [False, True])
def test_every_image_once_in_contiguous_windows_within_limits(padded):
    sizes = _sizes(300)
    planner = Planner(
        sizes, padded=padded, batch_size=8, batch_pixels=8 * 256 * 256, commit_seconds=1.0
    )
    seen = []
    for planned in planner:
        batch = planned.indices
        # measured speed, 2e6 pixels/s: windows of at most 2 MP after the first
        planner.learn(planned.window, planner.window_pixels(planned.window) / 2e6)
        window = planner.windows[planned.window]
        assert all(window.start <= i < window.stop for i in batch)  # never spans two shards
        known = [sizes[i] for i in batch if sizes[i] is not None]
        assert len(batch) <= 8
        if len(batch) > 1:
            height, width = max(h for h, _ in known), max(w for _, w in known)
            assert len(batch) * height * width <= 8 * 256 * 256
            if padded:
                assert len({(math.ceil(h / BUCKET), math.ceil(w / BUCKET)) for h, w in known}) == 1
            else:
                assert len(set(known)) == 1
        seen += batch
    assert sorted(seen) == list(range(300))
    starts = [w.start for w in planner.windows]
    stops = [w.stop for w in planner.windows]
    assert starts[0] == 0 and stops[-1] == 300 and starts[1:] == stops[:-1]
    assert stops[0] - starts[0] == 16 and len(planner.windows) > 10
    for w in range(1, len(planner.windows) - 1):  # full, and one more image would not fit
        assert planner.window_pixels(w) <= 2e6 < planner.window_pixels(w) + planner.pixels[stops[w]]


def test_windows_follow_pixels_not_image_counts():
    """Many tiny images, then large ones: a window of large images is as short in time as one
    of tiny images (counting images would put all the large ones in one late commit)."""
    sizes = [(16, 16)] * 120 + [(1000, 1000)] * 16
    planner = Planner(
        sizes, padded=False, batch_size=4, batch_pixels=4 * 1000 * 1000, commit_seconds=2.0
    )
    for planned in planner:  # 1e6 pixels/s: 2 MP per commit
        planner.learn(planned.window, planner.window_pixels(planned.window) / 1e6)
    # at most 2 MP (two large images) in every window after the first
    assert all(
        sum(s[0] * s[1] for s in sizes[w.start : w.stop]) <= 2e6 for w in planner.windows[1:]
    )
    assert sum(w.stop - w.start for w in planner.windows) == 136


def test_rewind_hands_out_unreceived_batches_again():
    from spp_extract.loader import Replay

    sizes = [(10, 10)] * 5 + [(20, 20)] * 5
    planner = Planner(sizes, padded=False, batch_size=2, batch_pixels=10**9, commit_seconds=1.0)
    replay = Replay(planner)
    it = iter(replay)
    first, second, third = next(it), next(it), next(it)
    assert replay.received().indices == [i for _, i in first]
    assert replay.rewind().indices == [i for _, i in second]  # the suspect, handed back
    again = list(replay)
    assert again[:1] == [third]
    assert sorted(i for b in [first, second, *again] for _, i in b) == list(range(10))


def test_partition_is_contiguous_balanced_and_complete():
    sizes = [(100, 100)] * 90 + [(1000, 1000)] * 10  # the last ten hold most pixels
    cuts = partition(sizes, 4)
    assert cuts[0] == 0 and cuts[-1] == 100 and cuts == sorted(cuts)
    pixels = [sum(h * w for h, w in sizes[a:b]) for a, b in itertools.pairwise(cuts)]
    assert max(pixels) <= 2 * (sum(pixels) / 4)
    assert cuts[1] > 50  # the many small images go together; the big ones are spread
    assert partition([], 3) == [0, 0, 0, 0]
    assert partition([(5, 5)], 3)[-1] == 1


def test_padding_only_for_small_images_when_asked():
    """``auto`` on a CPU: images up to ``pad_pixels`` share 64-px buckets, larger ones batch
    with their own size only."""
    rng = random.Random(1)
    small = [(rng.randint(32, 256), rng.randint(32, 256)) for _ in range(60)]
    large = [(500, 375)] * 3 + [(rng.randint(400, 900), rng.randint(400, 900)) for _ in range(20)]
    sizes = small + large
    limit = 384 * 384
    planner = Planner(
        sizes,
        padded=True,
        pad_pixels=limit,
        batch_size=32,
        batch_pixels=8 * 512 * 512,
        commit_seconds=1e9,
    )
    batches = [p.indices for p in planner]
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    for batch in batches:
        members = {sizes[i] for i in batch}
        if any(h * w > limit for h, w in members):
            assert len(members) == 1  # a large image only with its own size
        else:
            assert len({(math.ceil(h / BUCKET), math.ceil(w / BUCKET)) for h, w in members}) == 1
    assert any(len({sizes[i] for i in b}) > 1 for b in batches)  # small ones really mixed
    assert [b for b in batches if sizes[b[0]] == (500, 375)] == [[60, 61, 62]]
