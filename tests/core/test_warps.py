"""Warps of feature maps: exact identity and integer shifts, bilinear weights that sum to one."""

from __future__ import annotations

import pytest
import torch

from vq2pc.core.warps import affine_warps, shift_warps


def test_identity_and_integer_shifts_are_exact_permutations_with_replicated_borders() -> None:
    warps = shift_warps(1)
    assert len(warps) == 9 and warps[0] == (0.0, 1.0, 0.0, 0.0)
    assert len(shift_warps(2, "diamond")) == 13 and set(shift_warps(1, "diamond")) <= set(warps)
    t = affine_warps((4, 5), warps, torch.float64)
    assert torch.equal(t[0], torch.eye(20, dtype=torch.float64))
    f = torch.arange(20, dtype=torch.float64).view(4, 5)
    rows, cols = torch.arange(4), torch.arange(5)
    for (_, _, dy, dx), m in zip(warps, t):
        expected = f[(rows - int(dy)).clamp(0, 3)][:, (cols - int(dx)).clamp(0, 4)]  # content moves by (dy, dx)
        assert torch.equal((f.view(1, 20) @ m).view(4, 5), expected)


def test_rotations_and_scalings_interpolate_with_weights_summing_to_one() -> None:
    t = affine_warps((6, 6), [(15.0, 1.0, 0.0, 0.0), (-7.0, 1.2, 0.5, -0.5)], torch.float64)
    assert (t >= 0).all()
    torch.testing.assert_close(t.sum(1), torch.ones(2, 36, dtype=torch.float64), rtol=0, atol=1e-12)
    assert ((t > 0).sum(1) <= 4).all()  # bilinear: at most 4 source pixels per target pixel


def test_bad_warps_are_named() -> None:
    with pytest.raises(ValueError, match="scale > 0"):
        affine_warps((3, 3), [(0.0, 0.0, 0.0, 0.0)])
    with pytest.raises(ValueError, match="at least one warp"):
        affine_warps((3, 3), [])
    with pytest.raises(ValueError, match="radius"):
        shift_warps(-1)
