"""Fine-tuned distillation: it raises the training mixture likelihood, keeps exactness and normalization,
never returns worse than its start on validation, and leaves the source decoder untouched."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import tiny_vqvae

from vq2pc.circuit.distill import distill
from vq2pc.circuit.finetune import (
    FineTuneConfig,
    _Mixture,
    finetune,
    finetune_distill,
)
from vq2pc.data.datasets import DataSplits, load_dataset, to_model_space
from vq2pc.latents.selection import Selection
from vq2pc.models.train import TrainConfig, fit
from vq2pc.models.vqvae import VQVAE, VQVAEConfig

TINY_CATEGORICAL = VQVAEConfig(
    image_shape=(1, 2, 2), levels=3, leaf="categorical", latent_hw=(1, 1), K=3, D=2, hidden=4, res_blocks=0
)
"""A VQ-VAE over 1×2×2 images with 3 levels (81 images in all)."""


def _selection(codes: torch.Tensor) -> Selection:
    return Selection(codes, torch.zeros(codes.shape[0]), "sample")


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_dataset("digits", seed=0, limit=300)


@pytest.fixture(scope="module")
def vqvae(digits: DataSplits) -> VQVAE:
    return tiny_vqvae(digits, epochs=3)


def _train_log_lik(circuit, digits: DataSplits) -> float:
    x = to_model_space(digits.train_x, "gaussian", digits.levels, torch.Generator().manual_seed(5)).flatten(1)
    return float(circuit.log_prob(x).double().mean())


@pytest.mark.parametrize("components", ["posterior", "random"])
def test_finetuning_raises_the_training_mixture_likelihood(vqvae: VQVAE, digits: DataSplits, components: str) -> None:
    codes = torch.randint(0, 8, (24, 2, 2), generator=torch.Generator().manual_seed(0))
    selection = _selection(torch.unique(codes, dim=0))
    before = distill(vqvae, selection)
    state = {k: v.clone() for k, v in vqvae.state_dict().items()}
    cfg = FineTuneConfig(
        epochs=3,
        patience=3,
        lr=3e-3,
        batch_size=50,
        components=components,
        subset=8,
        top_k=2,
        refresh=2,
        progress=False,
    )
    after, res = finetune_distill(vqvae, selection, digits, cfg)
    assert _train_log_lik(after, digits) > _train_log_lik(before, digits) + 1.0
    assert res.best_epoch >= 1 and res.best_val_log_prob > res.start_val_log_prob
    assert after.meta["finetune"]["best_epoch"] == res.best_epoch
    assert all(torch.equal(v, vqvae.state_dict()[k]) for k, v in state.items()), "the source VQ-VAE changed"
    assert torch.allclose(after.log_weights.exp().sum().double(), torch.tensor(1.0, dtype=torch.float64))


def test_no_improvement_returns_the_start(vqvae: VQVAE, digits: DataSplits) -> None:
    """With a learning rate too small to matter, the validation likelihood cannot rise: the source decoder is kept."""
    selection = _selection(torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 7]]]))
    _, res = finetune_distill(
        vqvae, selection, digits, FineTuneConfig(epochs=1, lr=1e-12, progress=False, learn_weights=False)
    )
    assert res.best_epoch == 0 and res.best_val_log_prob == res.start_val_log_prob
    assert res.decoder is vqvae


def test_cosine_schedule_decays_the_learning_rate_to_zero(vqvae: VQVAE, digits: DataSplits) -> None:
    """Cosine decays per step over all epochs and ends at lr 0; constant keeps it."""
    codes = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[1, 1], [2, 2]]])
    runs = {
        s: finetune(
            vqvae,
            codes,
            torch.zeros(3),
            digits,
            FineTuneConfig(epochs=3, patience=3, lr=1e-3, batch_size=50, schedule=s, progress=False),
        )
        for s in ("constant", "cosine")
    }
    assert [h["lr"] for h in runs["constant"].history] == [1e-3] * 3
    expected = [0.5e-3 * (1 + math.cos(math.pi * e / 3)) for e in (1, 2, 3)]  # per step, read at epoch ends
    assert [h["lr"] for h in runs["cosine"].history] == pytest.approx(expected, abs=1e-12)


def test_categorical_finetuned_circuit_sums_to_one() -> None:
    """A tiny categorical model (1x2x2 images, L = 3): the fine-tuned circuit sums to 1 over all 81 images."""
    torch.manual_seed(0)
    model = VQVAE(TINY_CATEGORICAL).eval()
    g = torch.Generator().manual_seed(1)
    v = torch.randint(0, 3, (60, 1, 2, 2), generator=g, dtype=torch.uint8)
    splits = DataSplits(
        "tiny",
        3,
        (1, 2, 2),
        1,
        v[:40],
        torch.zeros(40, dtype=torch.long),
        v[40:],
        torch.zeros(20, dtype=torch.long),
        v[40:],
        torch.zeros(20, dtype=torch.long),
    )
    selection = _selection(torch.arange(3).view(3, 1, 1))
    circuit, res = finetune_distill(
        model, selection, splits, FineTuneConfig(epochs=2, lr=1e-2, batch_size=10, progress=False)
    )
    assert res.best_epoch >= 1
    every_image = torch.tensor(list(itertools.product(range(3), repeat=4)), dtype=torch.float32)
    total = torch.logsumexp(circuit.log_prob(every_image).double(), 0)
    assert abs(float(total)) < 1e-5


@pytest.mark.parametrize(
    "bad",
    [
        {"components": "some"},
        {"schedule": "linear"},
        {"epochs": 0},
        {"lr": -1.0},
        {"patience": -1},
        {"top_k": 0},
        {"batch_size": 1.5},
        {"clip": 0.0},
        {"clip": "1"},
        {"clip": math.inf},
        {"std_max": 0.0},
        {"std_max": -0.1},
        {"refresh_N": 0},
        {"refresh_N": 2.5},
    ],
)
def test_bad_settings_are_one_clear_error(bad: dict) -> None:
    """One line naming the setting and the value given (the ranges are declared on the fields)."""
    ((name, value),) = bad.items()
    with pytest.raises(ValueError) as info:
        FineTuneConfig(**bad)
    assert str(info.value).startswith(f"{name} must be ") and str(info.value).endswith(f"got {value!r}")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_clip_bounds_the_gradient_of_a_step(vqvae: VQVAE, digits: DataSplits, clip: float | None) -> None:
    """The gradient Adam applies (fit's last step leaves it in place) has global norm <= clip; unclipped, this
    batch's is larger than 0.5."""
    codes = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[1, 1], [2, 2]]])
    model = _Mixture(vqvae, codes, torch.zeros(3), FineTuneConfig(top_k=2))
    x = to_model_space(digits.train_x[:50], "gaussian", digits.levels, torch.Generator().manual_seed(0))
    fit(
        model,
        lambda m, batch: m.loss(batch[0]),
        (x,),
        (),
        TrainConfig(epochs=1, batch_size=50, clip=clip, progress=False),
        validate=lambda m: 0.0,
    )
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
    assert norm <= 0.5 + 1e-6 if clip else norm > 0.5


def test_refresh_N_stretches_the_refresh_interval_in_proportion_to_N() -> None:
    cfg = FineTuneConfig(refresh=100, refresh_N=4096)
    assert [cfg.for_N(n).refresh for n in (256, 4096, 4097, 16384, 65536)] == [100, 100, 101, 400, 1600]
    assert cfg.for_N(16384).refresh_N is None and FineTuneConfig(refresh=7).for_N(10**6).refresh == 7


def test_refresh_N_trains_like_the_interval_it_resolves_to(vqvae: VQVAE, digits: DataSplits) -> None:
    """N = 4 with refresh 1 above refresh_N = 2 runs exactly as refresh 2 (ceil(1·4/2)): the same circuit."""
    codes = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[1, 1], [2, 2]], [[3, 2], [1, 0]]])
    base = dict(epochs=1, patience=1, lr=3e-3, batch_size=25, top_k=1, train_limit=200, progress=False)
    scaled, _ = finetune_distill(vqvae, _selection(codes), digits, FineTuneConfig(refresh=1, refresh_N=2, **base))
    fixed, _ = finetune_distill(vqvae, _selection(codes), digits, FineTuneConfig(refresh=2, **base))
    every, _ = finetune_distill(vqvae, _selection(codes), digits, FineTuneConfig(refresh=1, **base))
    assert scaled.meta["finetune"]["refresh"] == 2
    assert torch.equal(scaled.leaf.loc, fixed.leaf.loc) and not torch.equal(scaled.leaf.loc, every.leaf.loc)


def test_the_returned_circuit_is_the_one_scored_best(vqvae: VQVAE, digits: DataSplits) -> None:
    """The circuit returned scores the best validation likelihood recorded, not the last epoch's."""
    codes = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[1, 1], [2, 2]], [[3, 2], [1, 0]]])
    cfg = FineTuneConfig(epochs=3, patience=3, lr=3e-3, batch_size=50, top_k=2, refresh=2, progress=False)
    circuit, res = finetune_distill(vqvae, _selection(codes), digits, cfg)
    assert res.best_epoch >= 1
    x_val = to_model_space(digits.val_x, "gaussian", digits.levels, torch.Generator().manual_seed(cfg.seed + 1))
    assert float(circuit.log_prob(x_val.flatten(1)).double().mean()) == pytest.approx(res.best_val_log_prob, rel=1e-5)


def test_std_max_caps_every_std_in_training_and_in_the_circuit(vqvae: VQVAE, digits: DataSplits) -> None:
    """With ``std_max`` every std of the circuit is below it, the validation score recorded is the capped
    circuit's own, and fine-tuning still raises the (capped) validation likelihood."""
    codes = torch.tensor([[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[1, 1], [2, 2]], [[3, 2], [1, 0]]])
    cfg = FineTuneConfig(epochs=2, patience=2, lr=3e-3, batch_size=50, top_k=2, refresh=2, std_max=0.05, progress=False)
    circuit, res = finetune_distill(vqvae, _selection(codes), digits, cfg)
    assert float(circuit.leaf.scale.max()) < 0.05
    assert float(distill(vqvae, _selection(codes)).leaf.scale.max()) > 0.05  # the cap is doing something here
    assert res.best_epoch >= 1 and res.best_val_log_prob > res.start_val_log_prob
    x_val = to_model_space(digits.val_x, "gaussian", digits.levels, torch.Generator().manual_seed(cfg.seed + 1))
    assert float(circuit.log_prob(x_val.flatten(1)).double().mean()) == pytest.approx(res.best_val_log_prob, rel=1e-5)
    assert circuit.meta["finetune"]["std_max"] == 0.05


def test_std_max_on_categorical_leaves_is_one_clear_error() -> None:
    v = torch.randint(0, 3, (30, 1, 2, 2), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    y = torch.zeros(10, dtype=torch.long)
    splits = DataSplits("tiny", 3, (1, 2, 2), 1, v[:10], y, v[10:20], y, v[20:], y)
    with pytest.raises(ValueError, match="std_max applies to Gaussian leaves only"):
        finetune_distill(
            VQVAE(TINY_CATEGORICAL).eval(),
            _selection(torch.arange(3).view(3, 1, 1)),
            splits,
            FineTuneConfig(epochs=1, std_max=0.1, progress=False),
        )


def test_bad_codes_are_one_clear_error(vqvae: VQVAE, digits: DataSplits) -> None:
    with pytest.raises(ValueError, match=r"codes \[N,h,w\]"):
        finetune(vqvae, torch.zeros(3, 4, dtype=torch.long), torch.zeros(3), digits)


DDP_CFG = FineTuneConfig(epochs=2, patience=2, lr=3e-3, batch_size=45, top_k=2, refresh=2, progress=False)


def _ddp_finetune(rank: int, folder: str) -> None:
    vqvae = VQVAE.load(f"{folder}/vqvae.pt")
    codes = torch.load(f"{folder}/codes.pt")
    res = finetune(vqvae, codes, torch.zeros(codes.shape[0]), load_dataset("digits", seed=0, limit=300), DDP_CFG)
    torch.save(
        {
            "decoder": res.decoder.state_dict(),
            "log_weights": res.log_weights,
            "history": [(h["train_loss"], h["val_log_prob"]) for h in res.history],
        },
        f"{folder}/rank{rank}.pt",
    )


@pytest.mark.slow
def test_finetuning_on_two_ranks_equals_one_process(vqvae: VQVAE, digits: DataSplits, tmp_path) -> None:
    """Under torchrun (2 gloo ranks) each rank scores half of every global batch (45 rows: 22 and 23) against
    the union of the components both halves picked; the steps, the validation and the result equal one process's."""
    from helpers import spawn_ranks

    codes = torch.randint(0, 8, (12, 2, 2), generator=torch.Generator().manual_seed(3))
    vqvae.save(tmp_path / "vqvae.pt")
    torch.save(codes, tmp_path / "codes.pt")
    one = finetune(vqvae, codes, torch.zeros(12), digits, DDP_CFG)
    spawn_ranks(_ddp_finetune, 2, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert one.best_epoch > 0 and len(one.history) == 2
    for got in ranks:
        torch.testing.assert_close(got["log_weights"], one.log_weights, rtol=1e-4, atol=1e-5)
        for k, v in one.decoder.state_dict().items():
            torch.testing.assert_close(got["decoder"][k], v, rtol=1e-4, atol=1e-5)
        for (loss, val), h in zip(got["history"], one.history):
            assert math.isclose(loss, h["train_loss"], rel_tol=1e-5) and math.isclose(
                val, h["val_log_prob"], rel_tol=1e-5
            )
