"""Small builders shared by several test modules."""

import itertools

import torch

from vq2pc.models.priors.pixelcnn import PixelCNNPrior, PriorConfig


def make_prior(K: int = 3, hw: tuple[int, int] = (2, 2), C: int = 2, hidden: int = 8, layers: int = 3,
               seed: int = 0, sharpen: float = 1.0) -> PixelCNNPrior:
    torch.manual_seed(seed)
    prior = PixelCNNPrior(PriorConfig(K=K, latent_hw=hw, num_classes=C, hidden=hidden, layers=layers)).eval()
    with torch.no_grad():  # sharpen > 1: further from uniform, classes further apart
        prior.head[-1].weight.mul_(sharpen)
        for layer in prior.layers:
            layer.cond.weight.mul_(sharpen)
    return prior


def all_codes(K: int, hw: tuple[int, int]) -> torch.Tensor:
    """Every grid in row-major lexicographic order: [K^{hw}, h, w]."""
    return torch.tensor(list(itertools.product(range(K), repeat=hw[0] * hw[1]))).view(-1, *hw)
