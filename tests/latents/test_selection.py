"""Tests of the selection strategies: exactness on tiny spaces, sampling distributions, errors."""

from __future__ import annotations

import pytest
import torch
from helpers import all_codes, make_prior
from scipy.stats import chisquare

from vq2pc.latents.beam import beam_search, stochastic_beam_search
from vq2pc.latents.enumerate import codes_to_index, enumerate_log_prior
from vq2pc.latents.selection import Selection, select


@pytest.fixture(scope="module")
def prior():
    """K=3, 2x2 grid, C=2 classes with p(c) = (1/3, 2/3): 81 latents."""
    p = make_prior(K=3, hw=(2, 2), C=2, sharpen=3.0, seed=1)
    p.set_class_prior(torch.tensor([0, 1, 1]))
    return p


@pytest.fixture(scope="module")
def tiny():
    """K=2, 2x1 grid, C=2 with p(c) = (19/20, 1/20): 4 latents; p(z) and q(z) differ enough for power."""
    p = make_prior(K=2, hw=(2, 1), C=2, sharpen=4.0, seed=3)
    p.set_class_prior(torch.tensor([0] * 19 + [1]))
    return p


def exact(prior) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(z) and log q(z) = log Σ_c (1/C) p(z|c) of every latent, lexicographic order."""
    z = all_codes(prior.K, prior.latent_hw)
    with torch.no_grad():
        per_class = prior.log_prob_all_classes(z).double()
    log_p = torch.logsumexp(per_class + prior.class_log_prior.double(), 1)
    log_q = torch.logsumexp(per_class, 1) - torch.log(torch.tensor(float(prior.num_classes)))
    return log_p, log_q


def test_exhaustive(prior) -> None:
    s = select(prior, "exhaustive", None)
    assert len(s) == 81 and s.strategy == "exhaustive"
    assert torch.equal(s.codes, all_codes(3, (2, 2)))
    with torch.no_grad():
        torch.testing.assert_close(s.log_prior, prior.log_prob(s.codes), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.log_weights("prior").exp().sum(), torch.tensor(1.0))
    torch.testing.assert_close(s.log_weights("uniform").exp(), torch.full((81,), 1 / 81))


def test_topk_equals_sorted_enumeration(prior) -> None:
    log_p, _ = exact(prior)
    ref_val, ref_idx = log_p.sort(descending=True)
    for max_space, is_exact in [(2**24, True), (10, False)]:  # enumeration / beam of width N
        s = select(prior, "topk", 30, max_space=max_space)
        assert s.info["exact"] is is_exact
        assert torch.equal(codes_to_index(s.codes, 3), ref_idx[:30])
        torch.testing.assert_close(s.log_prior.double(), ref_val[:30], atol=1e-5, rtol=0)


@pytest.mark.parametrize("width", [27, 81])
def test_inner_beam_search_from_root_is_exact_when_wide(prior, width: int) -> None:
    """Algorithm 2 from i_1 = 1 (start 0): a beam of width >= K^{HW-1} keeps every prefix of the
    last step, so its final beam is exactly the top-`width` latents by p(z)."""
    log_p, _ = exact(prior)
    root = torch.zeros((1, 2, 2), dtype=torch.long)
    r = beam_search(prior, root, torch.zeros((1, 2)), 0, width, batch_size=7)  # chunked
    assert r.codes.shape == (1, width, 2, 2)
    ref_val, ref_idx = log_p.sort(descending=True)
    assert torch.equal(codes_to_index(r.codes[0], 3), ref_idx[:width])
    torch.testing.assert_close(r.keys[0].double(), ref_val[:width], atol=1e-5, rtol=0)


def test_inner_beam_search_own_class_scores(prior) -> None:
    """One-hot class weights (Algorithm 1's literal {c}) rank by p(z|c)."""
    z = all_codes(3, (2, 2))
    with torch.no_grad():
        per_class = prior.log_prob_all_classes(z)
    root = torch.zeros((2, 2, 2), dtype=torch.long)
    own = torch.tensor([[0.0, -float("inf")], [-float("inf"), 0.0]])
    r = beam_search(prior, root, torch.zeros((2, 2)), 0, 81, class_log_weights=own)
    for c in range(2):
        assert torch.equal(codes_to_index(r.codes[c], 3), per_class[:, c].argsort(descending=True))
        torch.testing.assert_close(r.class_scores[c], per_class[codes_to_index(r.codes[c], 3)], atol=1e-5, rtol=0)


def check_beam(prior, s: Selection, N: int, log_p: torch.Tensor) -> None:
    """A DMBS selection: distinct, exact log p(z), exactly min(N, D·K^{HW-1}) latents for the D distinct
    first tokens drawn, and from each first token t the top latents of t's subtree by p(z)."""
    K, P = prior.K, prior.num_positions
    idx = codes_to_index(s.codes, K)
    assert idx.unique().numel() == len(s)
    torch.testing.assert_close(s.log_prior.double(), log_p[idx], atol=1e-5, rtol=0)
    first = s.codes.flatten(1)[:, 0]
    D, subtree = first.unique().numel(), K ** (P - 1)
    assert D == s.info["distinct_first_tokens"]
    assert len(s) == min(N, D * subtree), (len(s), N, D)
    assert s.info["shortfall"] == N - len(s) and ("shortfall_reason" in s.info) == (len(s) < N)
    for t in first.unique():
        kept = idx[first == t]
        assert len(kept) >= s.info["width"]
        sub = torch.arange(subtree * int(t), subtree * (int(t) + 1))
        assert set(kept.tolist()) == set(sub[log_p[sub].argsort(descending=True)[: len(kept)]].tolist())


def test_beam_dmbs_completes_each_start_exactly(prior) -> None:
    """Algorithm 1: with B = N // (s·C) = 9 = K^{HW-2}, a search from start token t keeps all its
    2-token prefixes, so its result is exactly the top latents with z_1 = t; repeated tokens merge into
    one wider search and a subtree too small for its width passes the rest to the other tokens."""
    log_p, _ = exact(prior)
    s = select(prior, "beam", 36, starts=2, beam_score="marginal", generator=torch.Generator().manual_seed(0))
    assert s.info["width"] == 9 and s.info["requested_N"] == 36
    check_beam(prior, s, 36, log_p)


@pytest.mark.parametrize("N", [37, 41, 50, 70])
def test_beam_meets_n_not_divisible_by_the_starts(prior, N: int) -> None:
    """The remainder N - s·C·B is not dropped: N latents whenever the drawn first tokens' subtrees hold N."""
    log_p, _ = exact(prior)
    met = 0
    for seed in range(6):
        s = select(prior, "beam", N, starts=2, beam_score="marginal", generator=torch.Generator().manual_seed(seed))
        check_beam(prior, s, N, log_p)
        met += len(s) == N
    assert met >= 1


def test_beam_class_score_ranks_each_search_by_its_own_class(prior) -> None:
    """Algorithm 1's BeamSearch(z, p, {c}, ..): with s = 1 and B = N // C = 9 = K^{HW-2} (exact searches),
    the selection holds the top 9 by p(z | c) of the start token's subtree for each class c; where both
    classes find a latent it is kept once and the gap is filled from the same subtrees: still N latents."""
    K, subtree = prior.K, prior.K ** (prior.num_positions - 1)
    z = all_codes(K, prior.latent_hw)
    with torch.no_grad():
        per_class = prior.log_prob_all_classes(z).double()  # [81, C]

    def top(c: int, t: int) -> set[int]:
        sub = torch.arange(subtree * t, subtree * (t + 1))
        return set(sub[per_class[sub, c].argsort(descending=True)[:9]].tolist())

    differs = filled = 0
    for seed in range(8):
        s = select(prior, "beam", 18, starts=1, generator=torch.Generator().manual_seed(seed))
        marginal = select(
            prior, "beam", 18, starts=1, beam_score="marginal", generator=torch.Generator().manual_seed(seed)
        )
        idx = set(codes_to_index(s.codes, K).tolist())
        firsts = s.codes.flatten(1)[:, 0].unique().tolist()
        starts = [(firsts[0], firsts[0])] if len(firsts) == 1 else [tuple(firsts), tuple(firsts[::-1])]
        primary = [top(0, t0) | top(1, t1) for t0, t1 in starts]
        assert any(p <= idx and (len(p) == 18 or p != idx) for p in primary), seed
        assert len(idx) == len(s) == 18 and s.info["beam_score"] == "class" and s.info["shortfall"] == 0
        assert {i // subtree for i in idx} == set(firsts)
        filled += all(len(p) < 18 for p in primary)
        differs += idx != set(codes_to_index(marginal.codes, K).tolist())
    assert differs >= 1 and filled >= 1  # the scores differ on this prior; the fill was exercised


def test_beam_score_must_be_known(prior) -> None:
    with pytest.raises(ValueError, match="beam_score must be one of"):
        select(prior, "beam", 18, starts=1, beam_score="joint")


def test_beam_returns_requested_n_when_subtrees_are_large() -> None:
    """Repeated start tokens do not cost components: N distinct latents come back."""
    p = make_prior(K=4, hw=(2, 2), C=2)
    s = select(p, "beam", 40, starts=5, generator=torch.Generator().manual_seed(1))
    assert len(s) == 40 and s.info["shortfall"] == 0 and "shortfall_reason" not in s.info
    assert codes_to_index(s.codes, 4).unique().numel() == 40


def test_beam_on_1x1_grid_returns_start_tokens() -> None:
    p = make_prior(K=4, hw=(1, 1), C=2)
    s = select(p, "beam", 4, starts=2, generator=torch.Generator().manual_seed(0))
    tokens = s.codes.flatten().unique()
    assert s.codes.shape[1:] == (1, 1) and len(s) == tokens.numel() == s.info["distinct_first_tokens"]
    assert s.info["shortfall"] == 4 - len(s) and ("shortfall_reason" in s.info) == (len(s) < 4)


def ordered_pair_test(select_pair, log_target: torch.Tensor, log_other: torch.Tensor, n: int) -> None:
    """First element ~ target; ordered pairs ~ successive sampling without replacement; power vs other."""
    first, pairs = torch.zeros(4), torch.zeros(4, 4)
    for _ in range(n):
        a, b = codes_to_index(select_pair(), 2).tolist()
        assert a != b
        first[a] += 1
        pairs[a, b] += 1
    q = log_target.softmax(0)  # renormalized in float64
    assert chisquare(first, n * q).pvalue > 1e-3
    expected = q[:, None] * q[None, :] / (1 - q[:, None])
    off = ~torch.eye(4, dtype=torch.bool)
    assert chisquare(pairs[off], n * expected[off] / expected[off].sum()).pvalue > 1e-3
    assert chisquare(first, n * log_other.softmax(0)).pvalue < 1e-4  # the test can tell the two apart


@pytest.mark.slow
def test_sample_is_paper_dmrs_without_replacement(tiny) -> None:
    """N=2 draws (c ~ U(C), z ~ p(z|c), distinct): the first matches q(z) = Σ_c (1/C) p(z|c), the
    ordered pair matches sampling without replacement from q (chi-square, 1200 repeats, fixed seed)."""
    log_p, log_q = exact(tiny)
    g = torch.Generator().manual_seed(0)
    ordered_pair_test(lambda: select(tiny, "sample", 2, generator=g).codes, log_q, log_p, 1200)


@pytest.mark.slow
def test_gumbel_is_exact_sampling_without_replacement_from_p(tiny) -> None:
    log_p, log_q = exact(tiny)
    g = torch.Generator().manual_seed(0)
    ordered_pair_test(lambda: select(tiny, "gumbel", 2, generator=g).codes, log_p, log_q, 1200)


@pytest.mark.slow
def test_stochastic_beam_search_samples_its_own_class_without_replacement(tiny) -> None:
    """A one-hot class row makes the Gumbel-top-k search sample from p(z | c), not p(z) (c = 1 has p(c) = 1/20)."""
    with torch.no_grad():
        log_own = tiny.log_prob_all_classes(all_codes(2, (2, 1))).double()[:, 1]
    log_p, _ = exact(tiny)
    g, own = torch.Generator().manual_seed(0), torch.tensor([[float("-inf"), 0.0]])
    root = torch.zeros((1, 2, 1), dtype=torch.long), torch.zeros((1, 2))
    ordered_pair_test(lambda: stochastic_beam_search(tiny, *root, 0, 2, g, own).codes[0], log_own, log_p, 1200)


@pytest.mark.slow
def test_stochastic_beam_search_from_a_prefix_samples_its_subtree(tiny) -> None:
    """From z_1 = 1 (start = 1) a width-1 search draws z_2 ~ p(z_2 | z_1 = 1, c) and never leaves the subtree."""
    with torch.no_grad():
        per_class = tiny.log_prob_all_classes(all_codes(2, (2, 1))).double()
    own = torch.tensor([[float("-inf"), 0.0]])
    prefix, scores = torch.tensor([[[1], [0]]]), tiny.next_log_probs_all_classes(torch.tensor([[[1], [0]]]), 0)[:, :, 1]
    g, counts = torch.Generator().manual_seed(0), torch.zeros(2)
    for _ in range(600):
        z = stochastic_beam_search(tiny, prefix, scores, 1, 1, g, own).codes[0, 0].flatten()
        assert z[0] == 1
        counts[z[1]] += 1
    expected = per_class[2:, 1].softmax(0)  # latents (1, 0) and (1, 1), class 1
    assert chisquare(counts, 600 * expected).pvalue > 1e-3


def test_stochastic_dmbs_keeps_algorithm_1_and_samples_within_each_search(prior) -> None:
    """beam_search="stochastic": N distinct latents from the same start tokens; at full width (B = 27, every
    start's subtree) the same set as the deterministic beam, below it a sample that differs for some seed."""
    K = prior.K
    for seed in range(3):
        kw = {"starts": 1, "generator": torch.Generator().manual_seed(seed)}
        det = select(prior, "beam", 54, **kw)
        sto = select(
            prior, "beam", 54, beam_search="stochastic", starts=1, generator=torch.Generator().manual_seed(seed)
        )
        assert set(codes_to_index(det.codes, K).tolist()) == set(codes_to_index(sto.codes, K).tolist())
    differs = 0
    for seed in range(6):
        det = select(prior, "beam", 12, starts=2, generator=torch.Generator().manual_seed(seed))
        sto = select(
            prior, "beam", 12, beam_search="stochastic", starts=2, generator=torch.Generator().manual_seed(seed)
        )
        idx = codes_to_index(sto.codes, K)
        assert len(sto) == idx.unique().numel() == 12 and sto.info["beam_search"] == "stochastic"
        assert set(sto.codes.flatten(1)[:, 0].tolist()) == set(det.codes.flatten(1)[:, 0].tolist())  # same starts
        differs += set(idx.tolist()) != set(codes_to_index(det.codes, K).tolist())
    assert differs >= 1
    with pytest.raises(ValueError, match="beam_search must be one of"):
        select(prior, "beam", 12, starts=1, beam_search="greedy")


@pytest.mark.parametrize("strategy", ["sample", "gumbel"])
def test_random_strategies_return_distinct_latents(prior, strategy: str) -> None:
    log_p, _ = exact(prior)
    for N in (40, 81):
        s = select(prior, strategy, N, generator=torch.Generator().manual_seed(1))
        idx = codes_to_index(s.codes, 3)
        assert len(s) == N and idx.unique().numel() == N
        torch.testing.assert_close(s.log_prior.double(), log_p[idx], atol=1e-5, rtol=0)


def test_data_counts(prior) -> None:
    codes = all_codes(3, (2, 2))[torch.tensor([7, 7, 1, 5, 5, 5, 7, 9])]
    s = select(prior, "data", None, codes_from_data=codes)
    assert codes_to_index(s.codes, 3).tolist() == [5, 7, 1, 9]
    torch.testing.assert_close(s.log_prior.exp(), torch.tensor([3, 3, 1, 1]) / 8.0)
    torch.testing.assert_close(s.log_weights("prior").exp(), torch.tensor([3, 3, 1, 1]) / 8.0)
    top2 = select(prior, "data", 2, codes_from_data=codes)
    torch.testing.assert_close(top2.log_weights("prior").exp(), torch.tensor([0.5, 0.5]))


def test_errors(prior) -> None:
    for strategy in ("sample", "gumbel", "beam", "topk"):
        with pytest.raises(ValueError, match=r"N=82 exceeds the latent space K\^\(HW\)=81"):
            select(prior, strategy, 82)
    with pytest.raises(ValueError, match="beam width"):
        select(prior, "beam", 19, starts=10)
    with pytest.raises(ValueError, match=r"81 exceeds max_space = 64"):
        select(prior, "exhaustive", None, max_space=64)
    with pytest.raises(ValueError, match="strategy must be one of"):
        select(prior, "nope", 3)
    with pytest.raises(ValueError, match="codes_from_data"):
        select(prior, "data", 3)
    with pytest.raises(ValueError, match="distinct codes"):
        select(prior, "data", 3, codes_from_data=torch.zeros((5, 2, 2), dtype=torch.long))
    with pytest.raises(ValueError, match="codes_from_data has codes outside"):
        select(prior, "data", 1, codes_from_data=torch.full((5, 2, 2), 3))
    with pytest.raises(ValueError, match="weights must be"):
        Selection(torch.zeros((1, 2, 2), dtype=torch.long), torch.zeros(1), "x").log_weights("bad")
    with pytest.raises(ValueError, match="beam width must be"):
        beam_search(prior, torch.zeros((1, 2, 2), dtype=torch.long), torch.zeros((1, 2)), 0, 0)


def test_sample_reports_concentrated_prior() -> None:
    """A prior with (almost) all mass on one latent cannot yield 4 distinct draws quickly: clear error."""
    p = make_prior(K=2, hw=(1, 1), C=1)
    with torch.no_grad():
        p.head[-1].weight.zero_()
        p.head[-1].bias.copy_(torch.tensor([0.0, -60.0]))
    with pytest.raises(ValueError, match="distinct latents in"):
        select(p, "sample", 2, generator=torch.Generator().manual_seed(0))
    assert len(select(p, "gumbel", 2, generator=torch.Generator().manual_seed(0))) == 2
    assert torch.isfinite(enumerate_log_prior(p, progress=False)).all()


def _dmrs_on_rank(rank: int, out: str) -> None:
    prior = make_prior(K=4, hw=(2, 2), C=2, sharpen=2.0)
    sel = select(prior, "sample", 40, generator=torch.Generator().manual_seed(3))
    torch.save((sel.codes, sel.info["draws"]), f"{out}/dmrs{rank}.pt")


@pytest.mark.slow
def test_sharded_dmrs_gives_every_rank_the_same_distinct_latents(tmp_path) -> None:
    """2 gloo ranks draw disjoint streams (each its slice of every batch), gather and deduplicate: both return
    the same N distinct latents of the prior, with the same draw count; one process is unchanged by this."""
    from helpers import spawn_ranks

    spawn_ranks(_dmrs_on_rank, 2, str(tmp_path))
    (a, draws_a), (b, draws_b) = (torch.load(tmp_path / f"dmrs{r}.pt") for r in range(2))
    assert torch.equal(a, b) and draws_a == draws_b
    assert a.shape == (40, 2, 2) and torch.unique(a.flatten(1), dim=0).shape[0] == 40
    assert int(a.min()) >= 0 and int(a.max()) < 4
    prior = make_prior(K=4, hw=(2, 2), C=2, sharpen=2.0)
    single = select(prior, "sample", 40, generator=torch.Generator().manual_seed(3))
    again = select(prior, "sample", 40, generator=torch.Generator().manual_seed(3))
    assert torch.equal(single.codes, again.codes)  # the single-process path keeps its one stream
    assert not torch.equal(single.codes, a)  # the ranks drew other (disjoint) streams
