"""Mask builders used by inpainting."""

from __future__ import annotations

import pytest
import torch

from vq2pc.data.masks import MASK_KINDS, make_mask


def test_deterministic_masks_hide_the_named_half() -> None:
    m = make_mask("left", (2, 4, 6), 3).view(3, 2, 4, 6)
    assert m.shape == (3, 2, 4, 6) and not m[..., :3].any() and m[..., 3:].all()
    m = make_mask("bottom", (1, 5, 4), 1).view(5, 4)
    assert m[:3].all() and not m[3:].any()
    m = make_mask("center", (1, 4, 4), 1).view(4, 4)
    assert not m[1:3, 1:3].any() and m.sum() == 12


def test_random_mask_is_seeded_and_shared_across_channels() -> None:
    a = make_mask("random", (3, 8, 8), 50, torch.Generator().manual_seed(0)).view(50, 3, 8, 8)
    b = make_mask("random", (3, 8, 8), 50, torch.Generator().manual_seed(0)).view(50, 3, 8, 8)
    assert torch.equal(a, b) and torch.equal(a[:, 0], a[:, 2])
    frac = a.float().mean().item()  # 3200 Bernoulli(1/2) pixels: se ≈ 0.009
    assert abs(frac - 0.5) < 0.04


def test_bad_kind_and_shape_raise() -> None:
    with pytest.raises(ValueError, match="unknown mask kind"):
        make_mask("diagonal", (1, 4, 4), 1)
    with pytest.raises(ValueError, match="image_shape"):
        make_mask("left", (4, 4), 1)  # type: ignore[arg-type]
    assert set(MASK_KINDS) == {"left", "right", "top", "bottom", "center", "random"}
