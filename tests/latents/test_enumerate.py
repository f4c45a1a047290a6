"""Tests of the exact enumeration of log p(z): brute-force equality, normalization, ordering, limits."""

from __future__ import annotations

import pytest
import torch
from helpers import all_codes, make_prior

from vq2pc.latents.enumerate import (
    check_space,
    codes_to_index,
    enumerate_log_prior,
    index_to_codes,
    latent_space_size,
)


@pytest.mark.parametrize("hw,K,C", [((2, 2), 3, 2), ((1, 3), 4, 3), ((2, 3), 3, 2), ((1, 1), 5, 2), ((3, 1), 2, 1)])
@pytest.mark.parametrize("batch_size,frontier_rows", [(16384, 2**22), (5, 7), (1, 1)])
def test_enumeration_equals_brute_force(hw, K, C, batch_size, frontier_rows) -> None:
    """Every chunking / frontier split gives log p(z) of the explicitly listed grids, summing to 1."""
    prior = make_prior(K=K, hw=hw, C=C, sharpen=2.0)
    prior.set_class_prior(torch.arange(C).repeat_interleave(torch.arange(1, C + 1)))  # non-uniform p(c)
    z = all_codes(K, hw)
    with torch.no_grad():
        ref = prior.log_prob(z)
    log_p = enumerate_log_prior(prior, batch_size=batch_size, frontier_rows=frontier_rows, progress=False)
    assert log_p.shape == (K ** (hw[0] * hw[1]),) and log_p.dtype == torch.float32
    torch.testing.assert_close(log_p, ref, atol=1e-5, rtol=0)
    assert abs(float(torch.logsumexp(log_p.double(), 0))) < 1e-5


def test_index_order_is_row_major_lexicographic() -> None:
    K, hw = 3, (2, 2)
    z = all_codes(K, hw)  # itertools.product order
    assert torch.equal(index_to_codes(torch.arange(K**4), K, *hw), z)
    assert torch.equal(codes_to_index(z, K), torch.arange(K**4))
    assert torch.equal(index_to_codes(torch.tensor([1]), K, *hw).flatten(), torch.tensor([0, 0, 0, 1]))
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 96**4, (100,), generator=g)
    assert torch.equal(codes_to_index(index_to_codes(idx, 96, 2, 2), 96), idx)


def test_limits_and_bad_input() -> None:
    prior = make_prior(K=3, hw=(2, 2), C=2)
    with pytest.raises(ValueError, match=r"3\^4 = 81 exceeds max_space = 80"):
        enumerate_log_prior(prior, max_space=80, progress=False)
    assert check_space(96, 2, 2, 2**27) == latent_space_size(96, 2, 2) == 96**4
    with pytest.raises(ValueError, match="exceeds max_space"):
        check_space(512, 4, 4, 2**27)
    with pytest.raises(ValueError, match="outside"):
        index_to_codes(torch.tensor([81]), 3, 2, 2)
    with pytest.raises(ValueError, match="outside"):
        codes_to_index(torch.full((1, 2, 2), 3), 3)
    with pytest.raises(ValueError, match="64-bit"):
        codes_to_index(torch.zeros((1, 7, 7), dtype=torch.long), 1024)
    prior.train()
    enumerate_log_prior(prior, progress=False)
    assert prior.training  # mode restored


def _enumerate_on_rank(rank: int, out: str) -> None:
    prior = make_prior(K=5, hw=(2, 2), C=2, sharpen=2.0)
    torch.save(enumerate_log_prior(prior, batch_size=7, frontier_rows=11, progress=False), f"{out}/rank{rank}.pt")
    one_code = enumerate_log_prior(make_prior(K=1, hw=(2, 2), C=2), progress=False)  # rank 1 has no first code
    torch.save(one_code, f"{out}/k1rank{rank}.pt")


@pytest.mark.slow
def test_sharded_enumeration_equals_unsharded(tmp_path) -> None:
    """2 gloo ranks split the first code (K = 5: slices of 2 and 3 subtrees; K = 1: one rank idle); each
    gets the whole vector, equal to one process; the sharded code path alone (sharded=True, one rank) too."""
    from helpers import spawn_ranks

    prior = make_prior(K=5, hw=(2, 2), C=2, sharpen=2.0)
    ref = enumerate_log_prior(prior, batch_size=7, frontier_rows=11, progress=False)
    one = enumerate_log_prior(prior, batch_size=7, frontier_rows=11, progress=False, sharded=True)
    torch.testing.assert_close(one, ref, atol=1e-6, rtol=0)
    spawn_ranks(_enumerate_on_rank, 2, str(tmp_path))
    for r in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{r}.pt"), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.load(tmp_path / f"k1rank{r}.pt"), torch.zeros(1), atol=1e-6, rtol=0)


def test_enumeration_is_reused_until_the_prior_changes() -> None:
    """The memo returns the same numbers without calling the prior again, and recomputes after a weight update."""
    from vq2pc.latents import enumerate as en

    prior = make_prior()
    first = en.enumerate_log_prior(prior, progress=False)
    calls = []
    original = prior.next_log_probs_all_classes
    prior.next_log_probs_all_classes = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[method-assign]
    again = en.enumerate_log_prior(prior, progress=False)
    assert torch.equal(first, again) and not calls
    with torch.inference_mode():  # callers get a copy
        again.zero_()
    assert torch.equal(en.enumerate_log_prior(prior, progress=False), first)
    with torch.no_grad():
        next(prior.parameters()).add_(0.5)
    changed = en.enumerate_log_prior(prior, progress=False)
    assert calls and not torch.equal(changed, first)
