"""The codec's block state: one row per class of images with equal pixels so far, and a prediction that is
the mixture's, deterministic, whichever product (sparse or dense) runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vq2pc.circuit.codec import model
from vq2pc.circuit.codec.model import CUTOFF, FLOOR, GEMM_CLAMP, BlockState


def _tables(levels: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(update [L, N], gemm_t [N, L])`` with factors from e^-80 to 1."""
    g = torch.Generator().manual_seed(seed)
    p = torch.exp(-torch.rand(levels, n, generator=g) * 80)
    return p, p.T.contiguous().clamp_min(GEMM_CLAMP)


def _per_image_state(log_w: torch.Tensor, p: torch.Tensor, pixels: np.ndarray) -> torch.Tensor:
    """One image's posterior row after ``pixels``: ``w ⊙ Π P[x_j]``, rescaled by the reciprocal of its leader
    and floored after each pixel (the update's defining formula)."""
    w = torch.exp(log_w.double() - log_w.max()).clamp_min(FLOOR)
    for sym in pixels:
        w = w * p[int(sym)].double()
        w = (w * (1.0 / w.max())).clamp_min(FLOOR)
    return w


def test_images_with_equal_prefixes_share_a_row_equal_to_their_own_posterior() -> None:
    p, _ = _tables(4, 300, seed=0)
    log_w = torch.randn(300, generator=torch.Generator().manual_seed(1))
    x = np.array([[0, 1, 2, 2], [0, 1, 2, 3], [0, 1, 3, 3], [0, 1, 2, 2], [1, 1, 1, 1], [0, 1, 3, 3]])
    st = BlockState(log_w, len(x))
    classes = [2, 2, 3, 4]  # classes after each pixel
    for i in range(x.shape[1]):
        st.update(p, x[:, i])
        assert len(st.w) == classes[i]
        for r in range(len(x)):
            assert torch.equal(st.w[st._group[r]], _per_image_state(log_w, p, x[r, : i + 1]))
    assert st._group[0] == st._group[3] and st._group[2] == st._group[5] and len(set(st._group)) == 4


def _reference(w: torch.Tensor, gemm_t: torch.Tensor) -> torch.Tensor:
    """``Σ_n w_n P[n, l]`` in float64 over the components at or above ``CUTOFF``."""
    return torch.where(w >= CUTOFF, w, 0.0) @ gemm_t.double()


def _spread_state(n: int, rows: int, spread: float, seed: int) -> BlockState:
    """A state of ``rows`` classes with leaders 1 and entries down to ``2^-spread``."""
    g = torch.Generator().manual_seed(seed)
    st = BlockState(torch.zeros(n), rows)
    w = torch.exp2(-torch.rand(rows, n, generator=g, dtype=torch.float64) * spread)
    st.w = w / w.amax(1, keepdim=True)
    st._group = np.arange(rows)
    return st


def test_both_products_give_the_mixture_deterministically(monkeypatch: pytest.MonkeyPatch) -> None:
    _, gemm_t = _tables(7, 400, seed=2)
    calls = {"sparse": 0, "dense": 0}
    for name in calls:
        orig = getattr(model, f"_{name}_product")

        def counted(*a, _orig=orig, _name=name):
            calls[_name] += 1
            return _orig(*a)

        monkeypatch.setattr(model, f"_{name}_product", counted)
    for spread in (40.0, 3000.0):  # every component active (dense product) / a few per row (sparse)
        st = _spread_state(400, 20, spread, seed=3)
        got = st.predict(gemm_t)
        torch.testing.assert_close(torch.from_numpy(got), _reference(st.w, gemm_t), rtol=2e-6, atol=0)
        assert np.array_equal(_spread_state(400, 20, spread, seed=3).predict(gemm_t), got)
    assert calls == {"sparse": 2, "dense": 2}
