"""The seams are protocols: vq2pc's models satisfy them, and models that vq2pc did not write work too."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from helpers import all_codes, make_prior, make_transformer
from torch import Tensor

from vq2pc.circuit.distill import distill
from vq2pc.circuit.exact import ExactModel
from vq2pc.core.leaves import Gaussian, Leaf
from vq2pc.core.protocols import Decoder, Prior
from vq2pc.core.random import gumbel_noise
from vq2pc.latents.enumerate import codes_to_index, enumerate_log_prior
from vq2pc.latents.selection import select
from vq2pc.models.vqvae import VQVAE, VQVAEConfig

PRIORS = {
    "pixelcnn": lambda: make_prior(K=4, hw=(3, 2), C=3, layers=2, seed=1),
    "transformer": lambda: make_transformer(K=4, hw=(3, 2), C=3, d=8, seed=1),
}


class TablePrior:
    """A prior written without vq2pc: independent positions, ``p(z_i = k | c) = softmax(table[c, i])_k``."""

    def __init__(self, K: int, hw: tuple[int, int], C: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.K, self.latent_hw, self.num_classes, self.training = K, hw, C, False
        self.table = torch.log_softmax(2 * torch.randn(C, hw[0] * hw[1], K, generator=g), -1)  # [C, P, K]
        self.class_log_prior = torch.log_softmax(torch.randn(C, generator=g), 0)

    def log_prob_all_classes(self, z: Tensor, batch_size: int = 8192) -> Tensor:
        flat = z.flatten(1)  # [B, P]
        return self.table[:, torch.arange(flat.shape[1]), flat].sum(-1).T  # [B, C]

    def next_log_probs_all_classes(self, z: Tensor, i: int) -> Tensor:
        return self.table[:, i].expand(z.shape[0], -1, -1)

    def start(self, classes: Tensor, prefix: Tensor | None = None, batch_size: int = 8192) -> tuple[Any, Tensor]:
        t = 0 if prefix is None else prefix.shape[1]
        return [classes, t], self.table[classes, t]

    def step(self, state: Any, tokens: Tensor) -> tuple[Any, Tensor | None]:
        state[1] += 1
        return state, self.table[state[0], state[1]] if state[1] < self.table.shape[1] else None

    def reorder(self, state: Any, index: Tensor) -> Any:
        return [state[0][index], state[1]]

    def sample(self, c: Tensor, generator: torch.Generator | None = None, batch_size: int = 8192) -> Tensor:
        logits = self.table[c]  # [n, P, K]
        return (logits + gumbel_noise(tuple(logits.shape), generator, c.device)).argmax(-1).view(-1, *self.latent_hw)

    def to(self, *args: Any, **kwargs: Any) -> TablePrior:
        return self

    def eval(self) -> TablePrior:
        return self

    def train(self, mode: bool = True) -> TablePrior:
        return self


class TableDecoder(torch.nn.Module):
    """A decoder written without vq2pc: every position owns a block of pixels, a code sets their means."""

    def __init__(self, K: int, hw: tuple[int, int], block: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.K, self.latent_hw = K, hw
        self.means = torch.nn.Parameter(torch.rand(K, block, generator=g))

    def decode(self, codes: Tensor) -> Leaf:
        mean = self.means[codes.flatten(1)].flatten(1)  # [B, P·block]
        return Gaussian(mean, torch.full_like(mean, 0.2))


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_vq2pc_models_satisfy_the_protocols(name: str) -> None:
    assert isinstance(PRIORS[name](), Prior)
    vqvae = VQVAE(VQVAEConfig(image_shape=(1, 4, 4), levels=17, latent_hw=(2, 2), K=3, D=4, hidden=8, res_blocks=0))
    assert isinstance(vqvae, Decoder) and (vqvae.K, vqvae.latent_hw) == (3, (2, 2))
    assert isinstance(TablePrior(3, (2, 2), 2, 0), Prior) and isinstance(TableDecoder(3, (2, 2), 4, 0), Decoder)
    assert not isinstance(vqvae, Prior) and not isinstance(object(), Decoder)


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_incremental_decoding_equals_next_log_probs(name: str) -> None:
    """start / step / reorder agree with the stateless next-position log-probabilities, for both priors."""
    prior = PRIORS[name]()
    z = torch.randint(0, 4, (4, 3, 2), generator=torch.Generator().manual_seed(2))
    flat = z.flatten(1)
    with torch.no_grad():
        state, logp = prior.start(torch.arange(3).expand(4, 3), batch_size=5)  # chunked for the PixelCNN
        for i in range(6):
            torch.testing.assert_close(logp, prior.next_log_probs_all_classes(z, i), atol=1e-5, rtol=0)
            if i == 2:  # reorder: reversed and duplicated
                order = torch.tensor([3, 3, 1, 0])
                state, z, flat = prior.reorder(state, order), z[order], flat[order]
            state, logp = prior.step(state, flat[:, i])
        assert logp is None


def test_a_foreign_prior_and_decoder_go_through_selection_enumeration_and_exm() -> None:
    """Selection, enumeration, distillation and ExM touch only protocol members: duck-typed models work."""
    prior, decoder = TablePrior(3, (2, 2), 2, seed=0), TableDecoder(3, (2, 2), 4, seed=1)
    z = all_codes(3, (2, 2))
    exact = torch.logsumexp(prior.log_prob_all_classes(z) + prior.class_log_prior, 1)
    torch.testing.assert_close(enumerate_log_prior(prior, progress=False), exact)
    top = select(prior, "topk", 10, max_space=10)  # beam search through start / step / reorder
    assert torch.equal(codes_to_index(top.codes, 3), exact.argsort(descending=True)[:10])  # independent: beam is exact
    for strategy in ("sample", "gumbel", "beam"):
        s = select(prior, strategy, 12, starts=2, generator=torch.Generator().manual_seed(0))
        assert codes_to_index(s.codes, 3).unique().numel() == len(s)
        torch.testing.assert_close(s.log_prior, exact[codes_to_index(s.codes, 3)])
    circuit = distill(decoder, select(prior, "exhaustive", None), weights="prior")
    x = torch.rand(5, 16, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ExactModel(decoder, prior, chunk=7).log_prob(x), circuit.log_prob(x), atol=1e-4, rtol=0)
    assert math.isclose(float(circuit.log_weights.exp().sum()), 1.0, rel_tol=1e-5)


def test_exact_model_names_what_a_model_lacks() -> None:
    prior = make_prior(K=3, hw=(2, 2))
    with pytest.raises(ValueError, match=r"not a Decoder: it lacks \[.*'decode'"):
        ExactModel(prior, prior)
    with pytest.raises(ValueError, match=r"not a Prior: it lacks \[.*'class_log_prior'"):
        ExactModel(TableDecoder(3, (2, 2), 4, seed=0), torch.nn.Linear(2, 2))
