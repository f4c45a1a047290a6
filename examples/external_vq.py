"""Distill a VQ model that vq2pc did not build: ``vector-quantize-pytorch``'s ``VectorQuantize``.

A small conv encoder / decoder around the external quantizer, with a Gaussian pixel head that
returns a :class:`vq2pc.Gaussian` leaf, is trained briefly on the embedded ``digits`` data
(8×8, L = 17 levels). vq2pc then fits its class-conditional PixelCNN prior on the codes,
selects N latents by sampling (DMRS), distills them into a mixture circuit, and queries the
circuit exactly. See ``docs/external-vq.md`` for the walk-through.

Needs the optional extra: ``pip install -e ".[external]"``. Runs in seconds on a CPU::

    python examples/external_vq.py
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from vector_quantize_pytorch import VectorQuantize

from vq2pc import (
    Gaussian,
    MixtureCircuit,
    PixelCNNPrior,
    PriorConfig,
    Selection,
    TrainConfig,
    distill,
    load_dataset,
    select,
)
from vq2pc.data import bpd, to_model_space
from vq2pc.models.priors.pixelcnn import train_prior


@dataclass
class ExampleConfig:
    """Sizes of the example (defaults: seconds on a CPU). K codebook size, D code length, N components."""

    K: int = 16
    D: int = 16
    hidden: int = 32
    vq_steps: int = 600
    prior_epochs: int = 15
    N: int = 512
    seed: int = 0


class ExternalVQ(nn.Module):
    """8×8 images -> 2×2 grid of codes (``VectorQuantize``) -> Gaussian pixel leaf.

    vq2pc needs only ``decode(codes [B,h,w]) -> Leaf`` with batch shape ``[B,S]``
    (plus ``eval()`` and ``parameters()``, which every ``nn.Module`` has).
    """

    def __init__(self, K: int, D: int, hidden: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(  # [B,1,8,8] -> [B,D,2,2]
            nn.Conv2d(1, hidden, 4, 2, 1), nn.ReLU(), nn.Conv2d(hidden, D, 4, 2, 1)
        )
        self.vq = VectorQuantize(
            dim=D, codebook_size=K, decay=0.8, commitment_weight=0.25, accept_image_fmap=True, kmeans_init=True
        )
        self.decoder = nn.Sequential(  # [B,D,2,2] -> [B,2,8,8]: mean and std parameters per pixel
            nn.ConvTranspose2d(D, hidden, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(hidden, 2, 4, 2, 1)
        )

    def head(self, z_q: Tensor) -> Gaussian:
        """Quantized codes ``[B,D,2,2]`` -> ``Gaussian`` with batch shape ``[B,64]`` (std >= 1e-3)."""
        out = self.decoder(z_q).flatten(2)  # [B,2,64]
        return Gaussian(torch.sigmoid(out[:, 0]), nn.functional.softplus(out[:, 1]) + 1e-3)

    def loss(self, x: Tensor) -> Tensor:
        """``x [B,1,8,8]`` in [0,1): mean over the batch of -log p(x|z_q) (nats) + commitment loss."""
        z_q, _, commit = self.vq(self.encoder(x))
        return -self.head(z_q).log_prob(x.flatten(1)).sum(1).mean() + commit.sum()

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """``x [B,1,8,8]`` -> code indices ``[B,2,2]`` (long)."""
        return self.vq(self.encoder(x))[1].long()

    def decode(self, codes: Tensor) -> Gaussian:
        """The seam vq2pc uses: codes ``[B,h,w]`` -> leaf ``p(x|z)`` with batch shape ``[B,S]``."""
        return self.head(self.vq.get_output_from_indices(codes))


def train_vq(model: ExternalVQ, x: Tensor, steps: int, seed: int) -> float:
    """Adam on mini-batches of ``x [n,1,8,8]``; returns the last batch loss (nats per image)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model.loss(x[torch.randint(len(x), (128,), generator=gen)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(loss.detach())


@dataclass
class Distilled:
    """What :func:`build` made: the external VQ model, vq2pc's prior, the selection, the circuit, the data."""

    vq: ExternalVQ
    prior: PixelCNNPrior
    selection: Selection
    circuit: MixtureCircuit
    x_test: Tensor  # [B,S] dequantized test images
    levels: int
    prior_val_nll: float  # nats per latent position


def build(cfg: ExampleConfig) -> Distilled:
    """Train the external VQ model and vq2pc's prior, select N latents (DMRS) and distill them."""
    torch.manual_seed(cfg.seed)
    data = load_dataset("digits", seed=cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x_train, x_val, x_test = (
        to_model_space(v, "gaussian", data.levels, gen) for v in (data.train_x, data.val_x, data.test_x)
    )

    # 1. The external VQ model.
    vq = ExternalVQ(cfg.K, cfg.D, cfg.hidden)
    train_vq(vq, x_train, cfg.vq_steps, cfg.seed)
    vq.eval()

    # 2. vq2pc's prior on its codes: p(z|c) with p(c) from the training labels.
    prior_cfg = PriorConfig(K=cfg.K, latent_hw=(2, 2), num_classes=data.num_classes, hidden=32, layers=3)
    train_cfg = TrainConfig(epochs=cfg.prior_epochs, batch_size=128, seed=cfg.seed, progress=False)
    prior, fit = train_prior(vq.codes(x_train), data.train_y, prior_cfg, train_cfg, vq.codes(x_val), data.val_y)

    # 3. Select N distinct latents (DMRS) and distill them into a mixture circuit.
    selection = select(prior, "sample", cfg.N, generator=torch.Generator().manual_seed(cfg.seed))
    circuit = distill(vq, selection, meta={"image_shape": [1, 8, 8], "levels": data.levels})
    return Distilled(vq, prior, selection, circuit, x_test.flatten(1), data.levels, fit.best_val_loss)


def top_half_mask() -> Tensor:
    """``[S]`` bool, True = observed: the top four rows of an 8×8 image."""
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4] = True
    return mask.flatten()


def queries(d: Distilled, seed: int = 0) -> dict[str, float]:
    """Exact queries on the circuit: test BPD (bits/dim), a marginal and a conditional (nats), a completion."""
    circuit, x, top = d.circuit, d.x_test, top_half_mask()
    log_px = circuit.log_prob(x)  # [B] log p(x)
    log_top = circuit.log_prob(x, top)  # [B] log p(x_top): the hidden pixels integrated out exactly
    completion = circuit.sample(
        x=x[:8], mask=top, generator=torch.Generator().manual_seed(seed)
    )  # x_bottom ~ p(.|x_top)
    return {
        "N": len(circuit),
        "prior_val_nll_nats_per_latent": d.prior_val_nll,
        "test_bpd": float(bpd(log_px, circuit.num_variables, d.levels, "gaussian").mean()),
        "uniform_bpd": math.log2(d.levels),
        "top_half_log_prob_mean": float(log_top.mean()),
        "bottom_given_top_log_prob_mean": float((log_px - log_top).mean()),
        "completion_keeps_observed": bool(torch.equal(completion[:, top], x[:8, top])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in asdict(ExampleConfig()).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    cfg = ExampleConfig(**vars(ap.parse_args()))
    torch.set_num_threads(1)  # tiny convolutions: one thread is fastest, and the numbers repeat exactly
    t0 = time.perf_counter()
    result = queries(build(cfg), cfg.seed)
    print(json.dumps({**result, "seconds": round(time.perf_counter() - t0, 1)}, indent=2))


if __name__ == "__main__":
    main()
