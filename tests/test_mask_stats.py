"""multidrop's dropout masks look independent to the tests a generator is judged by, and the
output's expectation is the input at every rate.

Masks are drawn from the layer itself (`benchmarks.mask_stats`, which also runs the same
statistics on numpy's PCG64 for the docs). Every seed is fixed, so each bound either holds or
not, run after run; the bounds are the ones independent fair draws meet (z within 4 standard
deviations; 4.5 over the 21 lags of one call).
"""

import pathlib
import sys

import keras
import numpy as np
import pytest
from conftest import to_numpy

from multidrop.dropout import Dropout

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # benchmarks/
from benchmarks import mask_stats


def test_calls_of_one_layer_are_pairwise_independent():
    stats = mask_stats.pairs(mask_stats.layer_masks(0.5, 0, 1024, 4096))
    assert stats["pairs"] == 1024 * 1023 // 2
    assert abs(stats["z"]) < 4 and stats["max_r"] < 0.12, stats


def test_seeds_0_to_63_are_pairwise_independent():
    masks = np.concatenate([mask_stats.layer_masks(0.5, s, 1, 16384) for s in range(64)])
    stats = mask_stats.pairs(masks)
    assert abs(stats["z"]) < 4 and stats["max_r"] < 0.12, stats


def test_seed_and_count_swapped_are_unrelated():
    """A generator whose keys of (s, c) and (c, s) coincide up to order draws permuted
    masks: every pair keeps the same number of elements."""
    stats = mask_stats.swapped(mask_stats.layer_masks)
    assert stats["pairs"] == 496
    assert stats["ties"] < 20 and abs(stats["z"]) < 4, stats  # ties: 4.4 expected


def test_elements_of_one_call_are_independent_near_and_far():
    """Neighbours, elements 2**k apart, and even against odd elements."""
    stats = mask_stats.lags(mask_stats.layer_masks(0.5, 1, 1, 2**20)[0])
    assert len(stats) == 21
    assert all(abs(z) < 4.5 for z in stats.values()), stats


def test_keep_rate_is_within_3_standard_deviations():
    stats = mask_stats.rates(mask_stats.layer_masks)
    assert all(abs(z) < 3 for z in stats.values()), stats


def test_the_statistics_tell_structure_from_pcg64():
    """The same statistics pass numpy's PCG64 and fail masks built with a known flaw."""
    rng = np.random.default_rng(0)
    independent = mask_stats.pcg64_masks(0.5, 0, 256, 4096)
    assert abs(mask_stats.pairs(independent)["z"]) < 4
    echoed = independent.copy()  # each call repeats 15% of its predecessor's elements
    for i in range(1, 256):
        part = slice(614 * (i % 2), 614 * (i % 2 + 1))  # where the predecessor is its own
        echoed[i, part] = independent[i - 1, part]
    assert mask_stats.pairs(echoed)["max_r"] > 0.12
    assert mask_stats.pairs(echoed)["z"] > 4

    def permuted(rate, seed, calls, size, count):  # (s, c) and (c, s): one mask, reordered
        base = mask_stats.pcg64_masks(rate, min(seed, count), 1, size, max(seed, count))
        return base[:, ::-1] if seed > count else base

    assert mask_stats.swapped(permuted)["ties"] == 496
    flat = rng.random(2**20) < 0.5
    echo = rng.random(2**20 - 1024) < 0.02  # 2% of elements repeat the one 1024 before
    flat[1024:][echo] = flat[:-1024][echo]
    assert abs(mask_stats.lags(flat)["lag 1024"]) > 4.5
    assert abs(mask_stats.lags(rng.random(2**20) < 0.5)["lag 1024"]) < 4.5


@pytest.mark.parametrize("rate", [1e-6, 1e-5, 0.3, 0.9999, 0.99999, 0.999995])
def test_expectation_is_the_input_at_every_rate(rate):
    """Over 2**25 ones (8 calls): the kept count is Binomial(n, 1 - rate) within 4 standard
    deviations, every kept element is scaled by one over the keep probability (to the
    threshold's resolution, 2**-32), and so the mean is 1 within 4 standard deviations."""
    size, calls = 2**22, 8
    n = size * calls
    layer, x = Dropout(rate, seed=17), keras.ops.ones((size,))
    kept, total, scales = 0, 0.0, set()
    for _ in range(calls):
        y = to_numpy(layer(x, training=True))
        nonzero = y[y != 0]
        kept += nonzero.size
        total += float(nonzero.astype(np.float64).sum())
        scales.update(np.unique(nonzero).tolist())
    sd = np.sqrt(n * rate * (1 - rate))
    assert abs(kept - n * (1 - rate)) < 4 * sd, (kept, n * (1 - rate), sd)
    (scale,) = scales
    assert abs(1 / scale - (1 - rate)) <= 2**-32 + (1 - rate) * 2**-23
    assert abs(total / n - 1) < 4 * scale * sd / n
