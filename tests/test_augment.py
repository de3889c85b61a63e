"""fewbits.data.augment: batched rotation + flip, and its random parameters."""

from __future__ import annotations

import math

import pytest
import torch

from fewbits.data import augment, random_augment_params


def _x(n=3, c=2, h=8, w=8, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def _no_flip(n):
    return torch.zeros(n, dtype=torch.bool)


def test_zero_angle_no_flip_is_the_identity():
    x = _x()
    assert torch.equal(augment(x, torch.zeros(3), _no_flip(3)), x)


def test_flip_is_exactly_a_left_right_mirror():
    x = _x()
    flips = torch.tensor([True, False, True])
    out = augment(x, torch.zeros(3), flips)
    assert torch.equal(out[0], x[0].flip(-1)) and torch.equal(out[2], x[2].flip(-1))
    assert torch.equal(out[1], x[1])


@pytest.mark.parametrize(("angle", "k"), [(math.pi / 2, 1), (-math.pi / 2, -1), (math.pi, 2)])
def test_quarter_turns_match_rot90(angle, k):
    # Positive angle = counter-clockwise as displayed = torch.rot90(k=1, dims=(H, W)).
    x = _x(c=3, h=7, w=7)
    out = augment(x, torch.full((3,), angle), _no_flip(3))
    torch.testing.assert_close(out, torch.rot90(x, k, dims=(-2, -1)), atol=1e-5, rtol=0)
    flipped = augment(x, torch.full((3,), angle), ~_no_flip(3))
    torch.testing.assert_close(
        flipped, torch.rot90(x, k, dims=(-2, -1)).flip(-1), atol=1e-5, rtol=0
    )


def test_positive_angle_turns_counter_clockwise():
    # A bright pixel right of the centre moves above it (row index decreases).
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 4, 7] = 1.0
    out = augment(x, torch.tensor([math.pi / 2]), _no_flip(1))
    assert out[0, 0].argmax().item() == 1 * 9 + 4


def test_non_square_images_rotate_rigidly():
    # The central 6x6 square of a 6x10 image turns like the square itself (no shear/stretch).
    x = _x(n=2, c=1, h=6, w=10)
    out = augment(x, torch.full((2,), math.pi / 2), _no_flip(2))
    centre = x[..., 2:8]
    torch.testing.assert_close(
        out[..., 2:8], torch.rot90(centre, 1, dims=(-2, -1)), atol=1e-5, rtol=0
    )


def test_constant_image_stays_constant_edges_replicated():
    x = torch.full((4, 3, 8, 8), 0.7)
    out = augment(x, torch.tensor([0.25, -0.25, 0.1, 1.0]), torch.tensor([True, False] * 2))
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


def test_batch_equals_one_image_at_a_time_and_input_is_untouched():
    x = _x(n=6, c=3, h=10, w=12, seed=1)
    before = x.clone()
    angles, flips = random_augment_params(6, torch.Generator().manual_seed(5), max_angle=1.0)
    out = augment(x, angles, flips)
    single = torch.cat(
        [augment(x[i : i + 1], angles[i : i + 1], flips[i : i + 1]) for i in range(6)]
    )
    torch.testing.assert_close(out, single, atol=1e-6, rtol=0)
    assert torch.equal(x, before)
    assert not torch.allclose(out, x)  # something actually happened


def test_float64_and_empty_batches():
    x = _x().double()
    out = augment(x, torch.tensor([0.2, 0.0, -0.2]), _no_flip(3))
    assert out.dtype == torch.float64 and torch.equal(out[1], x[1])
    assert augment(x[:0], torch.zeros(0), _no_flip(0)).shape == (0, 2, 8, 8)


def test_augment_rejects_bad_input():
    with pytest.raises(TypeError, match="to_float"):
        augment(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), torch.zeros(1), _no_flip(1))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        augment(_x(n=2), torch.zeros(3), _no_flip(2))
    with pytest.raises(TypeError, match="bool"):
        augment(_x(n=2), torch.zeros(2), torch.zeros(2))


def test_params_are_reproducible_and_in_range():
    a = random_augment_params(1000, torch.Generator().manual_seed(3))
    b = random_augment_params(1000, torch.Generator().manual_seed(3))
    c = random_augment_params(1000, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    angles, flips = a
    assert angles.shape == flips.shape == (1000,) and flips.dtype == torch.bool
    assert float(angles.abs().max()) <= 0.25 and float(angles.abs().max()) > 0.24
    assert float(angles.min()) < 0 < float(angles.max())
    assert 400 < int(flips.sum()) < 600
    angles, flips = random_augment_params(50, torch.Generator().manual_seed(0), 0.0, flip=False)
    assert not angles.any() and not flips.any()
    with pytest.raises(ValueError, match="max_angle"):
        random_augment_params(3, torch.Generator(), max_angle=-1)
