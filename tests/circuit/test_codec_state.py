"""The codec's block state: its shortcuts give the very bits of the plain formulas they replace."""

from __future__ import annotations

import numpy as np
import torch

from vq2pc.circuit.codec.model import CUTOFF, FLOOR, GEMM_CLAMP, BlockState


def _state(rows: int, count: int, n: int, seed: int) -> BlockState:
    """A block state whose rows have leaders 1 and spreads from 2^-10 to 2^-300: some columns fall below CUTOFF
    in every row, some in a few."""
    g = torch.Generator().manual_seed(seed)
    st = BlockState(torch.zeros(n), rows, count)
    spread = torch.rand(count, 1, generator=g, dtype=torch.float64) * 290 + 10
    w = torch.exp2(-torch.rand(count, n, generator=g, dtype=torch.float64) * spread)
    st.w[:count] = w / w.amax(1, keepdim=True)
    return st


def _update_reference(w: torch.Tensor, p: torch.Tensor, symbols: np.ndarray, count: int) -> torch.Tensor:
    """``w ⊙ P[x]`` with a row gather, rescaled to leaders of 1 and floored (the update's defining formula)."""
    out = w.clone()
    out[:count] *= p[torch.from_numpy(symbols.astype(np.int64))].double()
    out /= out.amax(1, keepdim=True).clamp_min(FLOOR)
    out[:count] = out[:count].clamp_min(FLOOR)
    return out


def test_update_with_one_level_everywhere_equals_the_row_gather() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.exp(-torch.rand(5, 300, generator=g) * 80)  # [L, N] update factors in [e^-80, 1]
    for symbols, count in [(np.full(16, 3), 16), (np.full(11, 2), 11), (np.array([1] * 15 + [4]), 16)]:
        st = _state(16, count, 300, seed=count)
        expected = _update_reference(st.w, p, symbols[:count], count)
        st.update(p, symbols[:count])
        assert torch.equal(st.w, expected) and bool((st.w[count:] == 0).all())


def test_predict_uses_the_columns_whose_largest_weight_reaches_cutoff() -> None:
    g = torch.Generator().manual_seed(1)
    gemm = torch.exp(-torch.rand(7, 400, generator=g) * 40).clamp_min(GEMM_CLAMP)  # [L, N]
    for count, cut in [(16, 0.1), (12, 0.9)]:  # most columns left (dense product) or few (compact)
        st = _state(16, count, 400, seed=7)
        dead = torch.rand(400, generator=g) < cut
        st.w[:, dead] = st.w[:, dead] * 2.0**-60  # below CUTOFF in every row: left out of the product
        idx = (st.w.amax(0) >= CUTOFF).nonzero().squeeze(1)
        w32 = torch.nn.functional.threshold(st.w.float(), CUTOFF, 0.0)
        if idx.numel() <= 200:
            expected = torch.mm(w32[:, idx].contiguous(), gemm[:, idx].contiguous().T)
        else:
            expected = torch.mm(w32, gemm.T)
        assert np.array_equal(st.predict(gemm), expected[:count].double().numpy())
