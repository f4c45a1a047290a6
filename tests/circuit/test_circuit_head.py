"""Circuits with decoder-head leaves (``HeadCategorical``): the decoder's categorical leaves held as features
and one shared convolution, exact on every query."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from vq2pc import ClassMixture, MixtureCircuit
from vq2pc.circuit.distill import decode_head_leaf
from vq2pc.circuit.kernels_head import HeadKernel
from vq2pc.core.head_leaf import HeadCategorical
from vq2pc.core.warps import affine_warps, shift_warps
from vq2pc.models.vqvae import VQVAE, VQVAEConfig


def _leaf(n: int = 6, h: int = 3, w: int = 2, levels: int = 3, k: int = 3, seed: int = 0) -> HeadCategorical:
    g = torch.Generator().manual_seed(seed)
    return HeadCategorical(
        torch.randn(n, 4, h, w, generator=g, dtype=torch.float64),
        torch.randn(levels, 4, k, k, generator=g, dtype=torch.float64),
        torch.randn(levels, generator=g, dtype=torch.float64),
    )


def _images(s: int, levels: int) -> torch.Tensor:
    """Every image ``[L^S, S]``."""
    return torch.cartesian_prod(*[torch.arange(levels, dtype=torch.float64)] * s).reshape(-1, s)


@pytest.mark.parametrize("k", [1, 3])
def test_the_circuit_sums_to_one_over_every_image_and_matches_its_table(k: int) -> None:
    leaf = _leaf(k=k)
    c = MixtureCircuit(leaf, torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    x = _images(6, 3)  # 729 images
    assert math.isclose(float(torch.logsumexp(c.log_prob(x), 0)), 0.0, abs_tol=1e-10)
    table = MixtureCircuit(leaf.categorical(), c.log_weights)
    torch.testing.assert_close(c.log_likelihoods(x), table.log_likelihoods(x), rtol=0, atol=1e-10)


def test_masked_pixels_are_summed_out_exactly() -> None:
    """log p(x_o) equals the log of the sum of p(x) over the hidden pixels' levels (brute force)."""
    c = MixtureCircuit(_leaf(seed=2), torch.zeros(6, dtype=torch.float64))
    x = _images(6, 3)
    mask = torch.tensor([True, False, True, True, False, True])
    full = c.log_prob(x)
    seen = x[:, mask]
    key = (seen * torch.tensor([27.0, 9.0, 3.0, 1.0], dtype=torch.float64)).sum(1).long()
    brute = torch.zeros(81, dtype=torch.float64).index_add_(0, key, full.exp()).log()
    got = c.log_prob(x, mask=mask.expand_as(x))
    torch.testing.assert_close(got, brute[key], rtol=0, atol=1e-10)


def test_kernel_slices_components_and_chunks_its_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    leaf = _leaf(n=9, seed=3)
    x = _images(6, 3)[::7]
    whole = HeadKernel(leaf).loglik(x, None, 0, 9).clone()
    torch.testing.assert_close(HeadKernel(leaf).loglik(x, None, 4, 7), whole[:, 4:7], rtol=0, atol=1e-12)
    monkeypatch.setattr("vq2pc.core.head_leaf.CHUNK_ELEMENTS", 20)  # one component per chunk
    torch.testing.assert_close(leaf.mean(), leaf.categorical().mean(), rtol=0, atol=1e-12)
    assert torch.equal(leaf.mode(), leaf.categorical().mode())
    torch.testing.assert_close(HeadCategorical(leaf.features, leaf.weight, leaf.bias).log_norm, leaf.log_norm)
    assert torch.equal(leaf[2:5].features, leaf.features[2:5]) and leaf[2:5].weight is leaf.weight


def test_save_load_round_trip_and_class_posterior_is_bayes(tmp_path: Path) -> None:
    leaf = _leaf(seed=4)
    c = MixtureCircuit(leaf, torch.randn(6, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    back = MixtureCircuit.load(c.save(tmp_path / "head.safetensors"))
    x = _images(6, 3)[::5]
    assert back.leaf.kind == "head-categorical" and torch.equal(back.log_prob(x), c.log_prob(x))
    labels = torch.tensor([0, 1, 1, 2, 0, 2])
    own = torch.nn.functional.one_hot(labels, 3).double()
    cm = ClassMixture(c, torch.log(0.9 * own + 0.05 * (1 - own)) + c.log_weights[:, None])
    joint = cm.log_weights.double()[None] + c.log_likelihoods(x).double()[:, :, None]  # [B, N, C]
    bayes = torch.logsumexp(joint, 1) - torch.logsumexp(joint, (1, 2))[:, None]
    torch.testing.assert_close(cm.class_posterior(x).double(), bayes, rtol=0, atol=1e-10)


def test_export_writes_the_categorical_table(tmp_path: Path) -> None:
    from vq2pc.circuit.export_npz import export_npz, from_npz

    c = MixtureCircuit(_leaf(seed=8), torch.randn(6, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
    back = from_npz(export_npz(c, tmp_path / "head.npz"))
    x = _images(6, 3)[::11]
    assert back.leaf.kind == "categorical"
    torch.testing.assert_close(back.log_prob(x).double(), c.log_prob(x), rtol=0, atol=1e-9)


def test_pixel_tables_and_compression_round_trip() -> None:
    pytest.importorskip("constriction")
    from vq2pc.circuit.codec import decode, encode

    leaf = _leaf(n=5, h=4, w=5, levels=6, seed=6)
    table = leaf.categorical().logits  # [N, S, L]
    for i in range(20):
        torch.testing.assert_close(leaf.pixel_log_table(i), table[:, i].T, rtol=0, atol=1e-12)
    c = MixtureCircuit(leaf.map(torch.Tensor.float), torch.zeros(5))
    x = c.sample(20, generator=torch.Generator().manual_seed(7)).long()
    assert torch.equal(torch.as_tensor(decode(c, encode(c, x, rows=8))).long(), x)


def test_decoded_head_leaves_are_the_vqvaes_categorical_leaves() -> None:
    torch.manual_seed(0)
    cfg = VQVAEConfig(image_shape=(1, 8, 8), levels=5, leaf="categorical", latent_hw=(2, 2), K=6, D=3, hidden=4)
    vq = VQVAE(cfg).eval()
    codes = torch.randint(0, 6, (7, 2, 2))
    leaf = decode_head_leaf(vq, codes, batch_size=3)
    with torch.no_grad():
        torch.testing.assert_close(leaf.categorical().logits, vq.decode(codes).logits, rtol=0, atol=1e-5)
    gauss = VQVAE(VQVAEConfig(image_shape=(1, 8, 8), levels=5, leaf="gaussian", latent_hw=(2, 2), K=6, D=3, hidden=4))
    with pytest.raises(ValueError, match="one-channel categorical VQ-VAE"):
        decode_head_leaf(gauss, codes)


def test_warped_copies_are_the_components_of_their_warped_features(tmp_path: Path) -> None:
    """A leaf with warps equals the plain leaf of every warped feature map (warp-major order) on every query,
    sums to 1 over all images, and survives save/load."""
    leaf = _leaf(n=4, seed=7)
    maps = affine_warps(leaf.grid, [*shift_warps(1)[:3], (25.0, 1.1, 0.0, 0.0)], torch.float64)
    warped = HeadCategorical(leaf.features, leaf.weight, leaf.bias, warps=maps)
    plain = HeadCategorical(
        torch.cat([(leaf.features.flatten(2) @ t).view_as(leaf.features) for t in maps]), leaf.weight, leaf.bias
    )
    assert warped.batch_shape == (16, 6) and warped.features.shape[0] == 4
    torch.testing.assert_close(warped.log_norm, plain.log_norm, rtol=0, atol=1e-12)
    log_w = torch.randn(16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    c, ref = MixtureCircuit(warped, log_w), MixtureCircuit(plain, log_w)
    x = _images(6, 3)
    assert math.isclose(float(torch.logsumexp(c.log_prob(x), 0)), 0.0, abs_tol=1e-10)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(9)) < 0.6
    torch.testing.assert_close(c.log_prob(x, mask=mask), ref.log_prob(x, mask=mask), rtol=0, atol=1e-10)
    torch.testing.assert_close(HeadKernel(warped).loglik(x, None, 3, 13), HeadKernel(plain).loglik(x, None, 3, 13))
    for i in range(6):
        torch.testing.assert_close(warped.pixel_log_table(i), plain.pixel_log_table(i), rtol=0, atol=1e-12)
    rows = torch.tensor([1, 6, 15])
    torch.testing.assert_close(warped[rows].features, plain.features[rows], rtol=0, atol=1e-12)
    torch.testing.assert_close(warped.mean(), plain.mean(), rtol=0, atol=1e-12)
    back = MixtureCircuit.load(c.save(tmp_path / "warped.safetensors"))
    assert back.leaf.num_warps == 4 and torch.equal(back.log_prob(x[::9]), c.log_prob(x[::9]))
    with pytest.raises(ValueError, match=r"warps must have shape \[D, S, S\]"):
        HeadCategorical(leaf.features, leaf.weight, leaf.bias, warps=maps[:, :5])
