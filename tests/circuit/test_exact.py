"""Tests of ExactModel: brute-force equality with the materialized exhaustive circuit, sampling statistics, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import assert_sample_frequencies, make_prior

from vq2pc.circuit import MixtureCircuit
from vq2pc.circuit.distill import decode_leaf, distill
from vq2pc.circuit.exact import ExactModel
from vq2pc.latents.selection import select
from vq2pc.models.priors.pixelcnn import PixelCNNPrior
from vq2pc.models.vqvae import VQVAE, VQVAEConfig

LEVELS = 17


def make_vqvae(
    leaf: str, image_shape=(1, 4, 4), latent_hw=(2, 2), K: int = 3, levels: int = LEVELS, seed: int = 0
) -> VQVAE:
    """Random VQ-VAE whose codewords are spread out, so that components differ clearly."""
    torch.manual_seed(seed)
    model = VQVAE(
        VQVAEConfig(
            image_shape=image_shape, levels=levels, leaf=leaf, latent_hw=latent_hw, K=K, D=4, hidden=8, res_blocks=0
        )
    ).eval()
    with torch.no_grad():
        model.quantizer.embedding.normal_(0.0, 2.0)
        model.decoder.head.weight.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def prior() -> PixelCNNPrior:
    """K=3 on a 2x2 grid (81 latents), C=2 with p(c) = (1/3, 2/3)."""
    p = make_prior(K=3, hw=(2, 2), C=2, hidden=8, layers=2, seed=1, sharpen=3.0)
    p.set_class_prior(torch.tensor([0, 1, 1]))
    return p


def materialized(vqvae: VQVAE, prior: PixelCNNPrior) -> MixtureCircuit:
    return distill(vqvae, select(prior, "exhaustive", None), weights="prior")


def data(leaf: str, n: int, seed: int, s: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [n, 1, 4, 4]`` in model space and a random mask ``[n, s]`` (first row fully observed)."""
    g = torch.Generator().manual_seed(seed)
    if leaf == "gaussian":
        x = torch.rand(n, s, generator=g)
    elif leaf == "categorical":
        x = torch.randint(0, LEVELS, (n, s), generator=g).float()
    else:
        x = torch.randint(0, 2, (n, s), generator=g).float()
    mask = torch.rand(n, s, generator=g) < 0.5
    mask[0] = True
    return x.view(n, 1, 4, 4), mask


@pytest.mark.parametrize("leaf", ["gaussian", "categorical", "bernoulli"])
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_log_prob_equals_materialized_circuit(prior: PixelCNNPrior, leaf: str, chunk: int) -> None:
    vqvae = make_vqvae(leaf)
    exact, circuit = ExactModel(vqvae, prior, chunk=chunk), materialized(vqvae, prior)
    x, mask = data(leaf, 6, seed=2)
    lp = exact.log_prob(x)
    assert lp.shape == (6,) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, circuit.log_prob(x), atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(exact.log_prob(x, mask), circuit.log_prob(x, mask), atol=2e-4, rtol=1e-5)
    # the components differ on every row by far more than the tolerance, so a chunking error would show
    ll = circuit.log_likelihoods(x)
    assert (ll.max(1).values - ll.min(1).values).min() > 1.0


@pytest.mark.parametrize("leaf", ["gaussian", "categorical"])
def test_whole_set_decodes_each_latent_once_and_equals_batched_and_materialized(
    prior: PixelCNNPrior, leaf: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Latent chunks outside, row batches inside: a 23-row set scored 4 rows at a time costs one pass
    of decodes (81 latents), and its log-likelihoods equal the row-batched calls and the materialized
    circuit; test_bpd hands the exact model the whole set at once."""
    from vq2pc.evaluate.density import model_log_prob

    vqvae = make_vqvae(leaf)
    exact, circuit = ExactModel(vqvae, prior, chunk=10), materialized(vqvae, prior)
    decoded = []
    decode = exact._decode
    monkeypatch.setattr(exact, "_decode", lambda idx: decoded.append(len(idx)) or decode(idx))
    x, mask = data(leaf, 23, seed=12)
    lp = exact.log_prob(x, mask, batch_size=4)
    assert sum(decoded) == 81
    per_batch = torch.cat([exact.log_prob(x[a : a + 4], mask[a : a + 4]) for a in range(0, 23, 4)])
    assert sum(decoded) == 81 * 7  # the old loop order: one pass per batch
    torch.testing.assert_close(lp, per_batch, atol=1e-5, rtol=0)
    torch.testing.assert_close(lp, circuit.log_prob(x, mask), atol=2e-4, rtol=1e-5)
    decoded.clear()
    whole = model_log_prob(exact, x.view(23, 16), batch_size=4)
    torch.testing.assert_close(whole, exact.log_prob(x).double(), atol=1e-6, rtol=0)
    assert sum(decoded) == 2 * 81


def test_test_bpd_decodes_each_latent_once_for_all_draws(prior: PixelCNNPrior, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three dequantization draws of a 9-image test set: one pass of decodes in all, and the same BPD
    (mean, per draw, per-image quantiles) as the materialized circuit with the same draws."""
    from vq2pc.evaluate.density import test_bpd

    vqvae = make_vqvae("gaussian")
    exact, circuit = ExactModel(vqvae, prior, chunk=10), materialized(vqvae, prior)
    decoded = []
    decode = exact._decode
    monkeypatch.setattr(exact, "_decode", lambda idx: decoded.append(len(idx)) or decode(idx))
    v = torch.randint(0, LEVELS, (9, 1, 4, 4), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    got = test_bpd(exact, v, "gaussian", LEVELS, draws=3, batch_size=4, generator=torch.Generator().manual_seed(6))
    want = test_bpd(circuit, v, "gaussian", LEVELS, draws=3, batch_size=4, generator=torch.Generator().manual_seed(6))
    assert sum(decoded) == 81
    assert got["draws"] == 3 and len(set(got["per_draw"])) == 3  # three different draws
    for key in ("mean", "median", "max"):
        assert got[key] == pytest.approx(want[key], abs=1e-4)
    assert got["per_draw"] == pytest.approx(want["per_draw"], abs=1e-4)


def test_structure_matches_materialized_circuit(prior: PixelCNNPrior) -> None:
    for leaf in ("gaussian", "categorical"):
        vqvae = make_vqvae(leaf)
        exact, circuit = ExactModel(vqvae, prior), materialized(vqvae, prior)
        assert len(exact) == len(circuit) == 81
        assert exact.num_variables == 16 and exact.leaf_kind == leaf
        assert exact.num_params == circuit.num_params


def test_empty_mask_gives_one_and_prior_weights_are_exact(prior: PixelCNNPrior) -> None:
    """log p(nothing observed) = 0 exactly normalizes the enumerated p(z); a tiny categorical
    model sums to 1 over all its outcomes."""
    exact = ExactModel(make_vqvae("gaussian"), prior, chunk=5)
    x, _ = data("gaussian", 3, seed=3)
    torch.testing.assert_close(exact.log_prob(x, torch.zeros(16, dtype=torch.bool)), torch.zeros(3), atol=1e-5, rtol=0)
    tiny = ExactModel(
        make_vqvae("categorical", image_shape=(1, 2, 2), latent_hw=(1, 1), K=4, levels=3),
        make_prior(K=4, hw=(1, 1), C=2, seed=4, sharpen=3.0),
        chunk=3,
    )
    xs = torch.tensor(list(itertools.product(range(3), repeat=4)), dtype=torch.float32)
    torch.testing.assert_close(tiny.log_prob(xs).double().exp().sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("leaf", ["gaussian", "categorical"])
def test_conditional_mean_and_posterior_equal_materialized(prior: PixelCNNPrior, leaf: str) -> None:
    vqvae = make_vqvae(leaf)
    exact, circuit = ExactModel(vqvae, prior, chunk=7), materialized(vqvae, prior)
    x, mask = data(leaf, 5, seed=5)
    cm = exact.conditional_mean(x, mask)
    torch.testing.assert_close(cm, circuit.conditional_mean(x, mask), atol=1e-4, rtol=1e-5)
    assert torch.equal(cm[mask], x.view(5, 16)[mask])
    post = circuit.posterior(x, mask)
    top_val, top_idx = exact.posterior_top(x, mask, k=4)
    ref_val, ref_idx = post.topk(4, 1)
    torch.testing.assert_close(top_val, ref_val, atol=1e-4, rtol=1e-5)
    assert torch.equal(top_idx, ref_idx)


def test_memory_budget_lowers_chunk_without_changing_results(prior: PixelCNNPrior) -> None:
    vqvae = make_vqvae("categorical")
    small = ExactModel(vqvae, prior, chunk=1000, memory_budget_mib=0.01)
    assert small.chunk < 81
    x, mask = data("categorical", 4, seed=6)
    torch.testing.assert_close(
        small.log_prob(x, mask), materialized(vqvae, prior).log_prob(x, mask), atol=2e-4, rtol=1e-5
    )


def test_unconditional_sample_frequencies_match_exact_probabilities() -> None:
    """(1,2,2) binary-level image, 1x1 grid, K=4: 16 outcomes; chi-square of 20000 draws."""
    tiny_prior = make_prior(K=4, hw=(1, 1), C=2, seed=8, sharpen=20.0)  # p(z|c) differ strongly
    tiny_prior.set_class_prior(torch.tensor([0, 0, 0, 1]))
    vqvae = make_vqvae("categorical", image_shape=(1, 2, 2), latent_hw=(1, 1), K=4, levels=2, seed=7)
    exact = ExactModel(vqvae, tiny_prior, chunk=3)
    assert_sample_frequencies(exact, levels=2, s=4, seed=9)


def test_unconditional_gaussian_sample_mean_matches_exact_mean(prior: PixelCNNPrior) -> None:
    vqvae = make_vqvae("gaussian")
    exact, circuit = ExactModel(vqvae, prior, chunk=10), materialized(vqvae, prior)
    n = 6000
    draws = exact.sample(n, generator=torch.Generator().manual_seed(10))
    mix_mean = circuit.log_weights.exp() @ circuit.component_means()
    z = (draws.mean(0) - mix_mean).abs() / (draws.std(0) / n**0.5)
    assert z.max().item() < 4.5, z.max().item()


@pytest.mark.parametrize("leaf", ["gaussian", "categorical"])
def test_conditional_samples_keep_observed_and_match_conditional_mean(prior: PixelCNNPrior, leaf: str) -> None:
    exact = ExactModel(make_vqvae(leaf), prior, chunk=20)
    x, mask = data(leaf, 2, seed=11)
    mask[0] = torch.rand(16, generator=torch.Generator().manual_seed(12)) < 0.5
    reps = 2000
    xr, mr = x.repeat(reps, 1, 1, 1), mask.repeat(reps, 1)
    draws = exact.sample(x=xr, mask=mr, generator=torch.Generator().manual_seed(13))
    assert draws.shape == (2 * reps, 16)
    assert torch.equal(draws[mr], xr.view(-1, 16)[mr])
    draws = draws.view(reps, 2, 16)
    emp_mean, emp_se = draws.mean(0), draws.std(0) / reps**0.5
    hidden = ~mask
    z = ((emp_mean - exact.conditional_mean(x, mask)).abs() / emp_se.clamp_min(1e-12))[hidden]
    assert z.max().item() < 4.5, z.max().item()


def test_bad_inputs_raise_clear_errors(prior: PixelCNNPrior) -> None:
    vqvae = make_vqvae("gaussian")
    with pytest.raises(ValueError, match="max_space"):
        ExactModel(vqvae, prior, max_space=80)
    with pytest.raises(ValueError, match="does not match"):
        ExactModel(vqvae, make_prior(K=4, hw=(2, 2), C=1, layers=2))
    with pytest.raises(ValueError, match="chunk"):
        ExactModel(vqvae, prior, chunk=0)
    exact = ExactModel(vqvae, prior)
    x, mask = data("gaussian", 3, seed=14)
    with pytest.raises(ValueError, match="shape"):
        exact.log_prob(torch.rand(3, 15))
    bad = x.clone().view(3, 16)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        exact.log_prob(bad)
    hide = torch.ones(3, 16, dtype=torch.bool)
    hide[1, 2] = False  # NaN in an unobserved entry is ignored
    torch.testing.assert_close(exact.log_prob(bad, hide), exact.log_prob(x, hide))
    with pytest.raises(ValueError, match="mask"):
        exact.log_prob(x, mask.float() * 0.5)
    with pytest.raises(ValueError, match="n must be"):
        exact.sample(0)
    with pytest.raises(ValueError, match="mask given without x"):
        exact.sample(3, mask=mask)
    with pytest.raises(ValueError, match="does not match the 3 rows"):
        exact.sample(4, x=x, mask=mask)
    with pytest.raises(ValueError, match="k must"):
        exact.posterior_top(x, mask, k=82)


def test_std_floor_is_the_same_for_exact_model_and_distilled_circuit(prior: PixelCNNPrior) -> None:
    vqvae = make_vqvae("gaussian")
    floor = float(
        decode_leaf(vqvae, torch.zeros(1, 2, 2, dtype=torch.long)).scale.median()
    )  # binds for half the pixels
    exact = ExactModel(vqvae, prior, chunk=7, std_floor=floor)
    circuit = distill(vqvae, select(prior, "exhaustive", None), weights="prior", std_floor=floor)
    assert float(circuit.leaf.scale.min()) == pytest.approx(floor) and circuit.meta["std_floor"] == floor
    x, mask = data("gaussian", 6, seed=3)
    torch.testing.assert_close(exact.log_prob(x, mask), circuit.log_prob(x, mask), atol=2e-4, rtol=1e-5)
    assert not torch.allclose(exact.log_prob(x), ExactModel(vqvae, prior).log_prob(x))
    with pytest.raises(ValueError, match="Gaussian leaves only"):
        ExactModel(make_vqvae("categorical"), prior, std_floor=0.1)
    with pytest.raises(ValueError, match="positive finite"):
        distill(vqvae, select(prior, "topk", 5), std_floor=0.0)


def _exact_on_rank(rank: int, out: str) -> None:
    from vq2pc.core.distributed import shard_range
    from vq2pc.evaluate.density import model_log_prob

    torch.set_num_threads(1)
    p = make_prior(K=3, hw=(2, 2), C=2, hidden=8, layers=2, seed=1, sharpen=3.0)
    p.set_class_prior(torch.tensor([0, 1, 1]))
    vqvae = make_vqvae("gaussian")
    exact = ExactModel(vqvae, p, chunk=10)
    decoded = []
    decode = exact._decode
    exact._decode = lambda idx: decoded.append(len(idx)) or decode(idx)
    x, mask = data("gaussian", 9, seed=13)
    torch.save(
        {
            "lp": exact.log_prob(x, mask, batch_size=4),
            "decoded": sum(decoded),
            "span": shard_range(81),
            "log_prior": exact.log_prior,
            "rows": model_log_prob(materialized(vqvae, p), x.view(9, 16), batch_size=2),
        },
        f"{out}/rank{rank}.pt",
    )


@pytest.mark.slow
def test_sharded_log_likelihoods_equal_single_process(prior: PixelCNNPrior, tmp_path) -> None:
    """2 gloo ranks: each decodes only its slice of the 81 latents, the log-sum-exp all-reduce gives the
    single-process ExM log-likelihoods; a circuit scored on each rank's rows and gathered is the same too."""
    from helpers import spawn_ranks

    vqvae = make_vqvae("gaussian")
    exact, circuit = ExactModel(vqvae, prior, chunk=10), materialized(vqvae, prior)
    x, mask = data("gaussian", 9, seed=13)
    ref = exact.log_prob(x, mask, batch_size=4)
    spawn_ranks(_exact_on_rank, 2, str(tmp_path))
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [g["span"] for g in got] == [(0, 40), (40, 81)] and [g["decoded"] for g in got] == [40, 41]
    for g in got:
        torch.testing.assert_close(g["lp"], ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(g["log_prior"], exact.log_prior, atol=1e-5, rtol=0)
        torch.testing.assert_close(g["rows"], circuit.log_prob(x.view(9, 16)).double(), atol=1e-5, rtol=0)
