"""Data-parallel training (VQ-VAE, prior, continuous mixture, EiNet) over 2 gloo ranks equals one process on the
same global batches; a killed
rank resumes; AMP is refused off CUDA."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from helpers import spawn_ranks, tiny_cm_paper

from vq2pc.baselines.cm import CMConfig, train_cm
from vq2pc.data import load_dataset
from vq2pc.models.priors.base import _nll_per_latent
from vq2pc.models.priors.pixelcnn import PixelCNNPrior, PriorConfig, train_prior
from vq2pc.models.train import TrainConfig, fit
from vq2pc.models.vqvae import VQVAE, VQVAEConfig, train_vqvae

pytestmark = pytest.mark.slow

# 70 training images in global batches of 15: ranks hold 7 and 8 rows, the last batch 5 and 5.
VQ_CFG = VQVAEConfig(
    image_shape=(1, 8, 8), levels=17, leaf="gaussian", latent_hw=(2, 2), K=6, D=3, hidden=8, res_blocks=1
)
# k-means initialisation and dead-code replacement see the global batch under DDP, but they are chaotic:
# a 1e-6 change of their input (the float noise of another conv batch size) moves one epoch's weights
# by 1e-2, in one process too. So with them only the ranks' agreement is exact.
KMEANS_CFG = replace(VQ_CFG, quantizer_opts={"kmeans_init": True, "dead_code_threshold": 0.5})
PRIOR_CFG = PriorConfig(K=5, latent_hw=(2, 2), num_classes=3, hidden=8, layers=2)
CM_CFG = CMConfig(image_shape=(1, 8, 8), leaf="gaussian", levels=17, latent_dim=3, hidden=8, train_points=16)
TCFG = TrainConfig(epochs=1, batch_size=15, lr=3e-3, seed=4, progress=False)


def _digits():
    d = load_dataset("digits", seed=0)
    return replace(d, train_x=d.train_x[:70], train_y=d.train_y[:70], val_x=d.val_x[:33], val_y=d.val_y[:33])


def _codes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, (n, 2, 2), generator=g), torch.randint(0, 3, (n,), generator=g)


def _train_both() -> dict[str, dict[str, torch.Tensor]]:
    vqvae, r1 = train_vqvae(_digits(), VQ_CFG, TCFG)
    (z, c), (vz, vc) = _codes(61, 1), _codes(20, 2)
    prior, r2 = train_prior(z, c, PRIOR_CFG, TCFG, vz, vc)
    cm, r3 = train_cm(_digits(), CM_CFG, TCFG)
    return {
        "vqvae": vqvae.state_dict(),
        "prior": prior.state_dict(),
        "cm": cm.state_dict(),
        "loss": torch.tensor(
            [
                r1.history[0]["train"],
                r1.history[0]["val"],
                r2.history[0]["val"],
                r3.history[0]["train"],
                r3.history[0]["val"],
            ]
        ),
    }


def _ddp_epoch(rank: int, out: str) -> None:
    torch.save(
        {**_train_both(), "kmeans": train_vqvae(_digits(), KMEANS_CFG, TCFG)[0].state_dict()}, f"{out}/rank{rank}.pt"
    )


def _ranks(per_rank: Callable[[int, str], None], tmp_path: Path, name: str) -> list[Any]:
    """What ``per_rank(rank, folder)`` saved as ``{name}{rank}.pt`` on each of 2 gloo ranks."""
    spawn_ranks(per_rank, 2, str(tmp_path))
    return [torch.load(tmp_path / f"{name}{r}.pt") for r in range(2)]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k


def test_one_ddp_epoch_of_vqvae_prior_and_cm_equals_one_process(tmp_path: Path) -> None:
    """Same global batches, dequantization noise and (CM) integration points, gradients averaged with the right weights for uneven shards (the
    prior's 61 codes end in a 1-row batch: one rank computes a stand-in row with weight 0),
    BatchNorm on global-batch statistics: parameters, BatchNorm buffers and losses within 1e-5 of one
    process. With k-means init and dead-code replacement the ranks hold identical weights."""
    torch.set_num_threads(1)
    ref = _train_both()
    got = _ranks(_ddp_epoch, tmp_path, "rank")
    for g in got:
        for part in ("vqvae", "prior", "cm"):
            _close(ref[part], g[part])
        torch.testing.assert_close(g["loss"], ref["loss"], atol=1e-5, rtol=1e-6)
    assert all(torch.equal(got[0]["kmeans"][k], got[1]["kmeans"][k]) for k in got[0]["kmeans"])
    # one epoch moved the weights: equality is not the initialisation's
    torch.manual_seed(TCFG.seed)
    init = VQVAE(VQ_CFG).state_dict()
    assert any((init[k] - ref["vqvae"][k]).abs().max() > 1e-3 for k in init if init[k].is_floating_point())


def _einet() -> tuple[dict[str, torch.Tensor], list[dict]]:
    from vq2pc.baselines.einet import EiNetConfig, train_einet

    d = _digits()
    cfg = EiNetConfig(d.image_shape, leaf="gaussian", levels=d.levels, pieces=(4,), num_input_units=2, num_sum_units=2)
    model, result = train_einet(d, cfg, TCFG)
    return model.state_dict(), result.history


def _ddp_einet(rank: int, out: str) -> None:
    torch.save(_einet(), f"{out}/einet{rank}.pt")


def test_one_ddp_epoch_of_the_einet_equals_one_process(tmp_path: Path) -> None:
    """The libcirkit EiNet under DDP: the same weights and losses as one process (to 1e-5)."""
    pytest.importorskip("cirkit")
    torch.set_num_threads(1)
    ref, history = _einet()
    for got, got_history in _ranks(_ddp_einet, tmp_path, "einet"):
        _close(ref, got)
        assert got_history[0]["train"] == pytest.approx(history[0]["train"], abs=1e-5)
        assert got_history[0]["val"] == pytest.approx(history[0]["val"], abs=1e-5)


def _prior_fit(checkpoint: str, die_after: int | None = None) -> PixelCNNPrior:
    torch.manual_seed(0)
    model = PixelCNNPrior(PRIOR_CFG)
    calls = [0]

    def loss_fn(m, batch):
        calls[0] += 1
        if die_after is not None and calls[0] > die_after and int(os.environ.get("RANK", "0")) == 1:
            os._exit(17)  # rank 1 killed in the middle of epoch 2
        return _nll_per_latent(m, batch)

    (z, c), (vz, vc) = _codes(61, 1), _codes(20, 2)
    fit(
        model,
        loss_fn,
        (z, c),
        (vz, vc),
        replace(TCFG, epochs=2),
        checkpoint=checkpoint,
        kind="prior",
        meta={"config": {"K": 5}},
    )
    return model


def _killed(rank: int, out: str) -> None:
    _prior_fit(f"{out}/prior.pt", die_after=7)  # epoch 1: 5 steps + 1 validation call; dies in epoch 2


def _resumed(rank: int, out: str) -> None:
    torch.save(_prior_fit(f"{out}/prior.pt").state_dict(), f"{out}/rank{rank}.pt")


def test_killed_rank_resumes_from_the_last_checkpoint(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    ref = _prior_fit(str(tmp_path / "single.pt")).state_dict()
    with pytest.raises(Exception, match=r"17|exit"):
        spawn_ranks(_killed, 2, str(tmp_path))
    ck = torch.load(tmp_path / "prior.pt", weights_only=True)
    assert ck["train_state"]["epoch"] == 1  # the first epoch's checkpoint survived the kill
    for got in _ranks(_resumed, tmp_path, "rank"):
        _close(ref, got)


def test_amp_is_refused_off_cuda() -> None:
    model = PixelCNNPrior(PRIOR_CFG)
    (z, c) = _codes(8, 1)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        fit(model, _nll_per_latent, (z, c), (z, c), replace(TCFG, amp="bf16"))


CM_PAPER_CFG = tiny_cm_paper((1, 8, 8), 17)


def _cm_paper() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    cm, result = train_cm(_digits(), CM_PAPER_CFG, replace(TCFG, epochs=2))
    return cm.state_dict(), torch.tensor([h[k] for h in result.history for k in ("train", "val")])


def _ddp_cm_paper(rank: int, out: str) -> None:
    torch.save(_cm_paper(), f"{out}/rank{rank}.pt")


def test_ddp_cm_paper_recipe_equals_one_process(tmp_path: Path) -> None:
    """The paper recipe's top-1 picks are united over the ranks (every rank decodes the same grid points), so
    two epochs over 2 gloo ranks equal one process: parameters and losses within 1e-5."""
    torch.set_num_threads(1)
    ref, ref_loss = _cm_paper()
    for got, loss in _ranks(_ddp_cm_paper, tmp_path, "rank"):
        _close(ref, got)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-6)
