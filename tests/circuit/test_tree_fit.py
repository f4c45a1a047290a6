"""Tree structure and latent variable distillation: patch partition, Chow-Liu, counted tables, EM."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from vq2pc.circuit.tree_fit import Smoothing, adam_fit, bpd, distill_tree, em_fit, smoothing
from vq2pc.circuit.tree_kmeans import _patches, patch_kmeans_codes
from vq2pc.circuit.tree_structure import chow_liu, mutual_information, patch_owner
from vq2pc.models.train import TrainConfig


def test_patch_owner_partitions_pixels_by_position() -> None:
    owner = patch_owner((1, 28, 28), (4, 4))
    assert torch.bincount(owner).tolist() == [49] * 16
    assert owner.view(28, 28)[6, 7].item() == 1 and owner.view(28, 28)[7, 6].item() == 4
    assert patch_owner((2, 3, 5), (2, 2)).tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 2, 2, 2, 3, 3] * 2


def test_a_shifted_grid_moves_the_patch_borders_between_the_unshifted_ones() -> None:
    plain, shifted = patch_owner((1, 6, 6), (3, 3)).view(6, 6), patch_owner((1, 6, 6), (4, 4), shift=1).view(6, 6)
    assert plain[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert shifted[0].tolist() == [0, 1, 1, 2, 2, 3] and shifted[:, 0].tolist() == [0, 4, 4, 8, 8, 12]
    assert torch.bincount(shifted.flatten()).view(4, 4)[0].tolist() == [1, 2, 2, 1]
    rows_only = patch_owner((1, 6, 6), (4, 3), shift=(1, 0)).view(6, 6)
    assert rows_only[:, 0].tolist() == [0, 3, 3, 6, 6, 9] and rows_only[0].tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="empty"):
        patch_owner((1, 2, 2), (2, 2), shift=3)  # the first row of patches would hold only padding


def test_mutual_information_and_chow_liu_recover_a_chain() -> None:
    g = torch.Generator().manual_seed(0)
    n, K = 4000, 3
    z = [torch.randint(0, K, (n,), generator=g)]
    for _ in range(4):  # a Markov chain 0 - 1 - 2 - 3 - 4, each copying its predecessor 80% of the time
        keep = torch.rand(n, generator=g) < 0.8
        z.append(torch.where(keep, z[-1], torch.randint(0, K, (n,), generator=g)))
    codes = torch.stack([z[0], z[3], z[1], z[4], z[2]], 1)  # positions shuffled: chain = 0, 2, 4, 1, 3
    mi = mutual_information(codes, K, pairs_per_chunk=3)
    joint = torch.bincount(codes[:, 0] * K + codes[:, 2], minlength=K * K).double().view(K, K) / n
    pa, pb = joint.sum(1), joint.sum(0)
    brute = sum(joint[a, b] * math.log(joint[a, b] / (pa[a] * pb[b])) for a in range(K) for b in range(K))
    assert abs(float(mi[0, 2]) - brute) < 1e-9 and torch.equal(mi, mi.T)
    parent = chow_liu(mi)
    edges = {frozenset((c, int(p))) for c, p in enumerate(parent.tolist()) if p >= 0}
    assert edges == {frozenset(e) for e in [(0, 2), (2, 4), (4, 1), (1, 3)]}
    assert parent[4] == -1  # the chain's centre is the root


def test_distilled_tables_are_the_smoothed_counted_frequencies() -> None:
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 2, (50, 4), generator=g)  # a 2x2 grid, K = 2
    images = torch.randint(0, 3, (50, 1, 2, 4), generator=g)  # 2x4 images, L = 3: 2 pixels a patch
    prior = Smoothing(0.1 + torch.rand(8, 3, generator=g), 0.5)
    c = distill_tree(codes, images, 2, 3, (1, 2, 4), (2, 2), prior)
    v, owner, leaves = images.reshape(50, 8), c.owner, c.log_params().leaves.exp().detach()
    for i, lv, k in itertools.product(range(8), range(3), range(2)):
        with_k = codes[:, owner[i]] == k
        expected = ((v[with_k, i] == lv).sum() + prior.leaf[i, lv]) / (with_k.sum() + prior.leaf[i].sum())
        assert abs(float(leaves[i, lv, k] - expected)) < 1e-6
    root, edges = (t.exp().detach() for t in c.log_params()[:2])
    assert torch.allclose(root, (torch.bincount(codes[:, c.tree.root], minlength=2) + 0.5) / 51, atol=1e-6)
    child = int(c.tree.children[0])
    a, b = codes[:, c.tree.parent[child]], codes[:, child]
    table = torch.bincount(a * 2 + b, minlength=4).view(2, 2).float() + 0.5
    assert torch.allclose(edges[0], table / table.sum(1, keepdim=True), atol=1e-6)


def test_tied_leaves_are_the_tied_maximum_of_the_complete_counts() -> None:
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(0, 3, (80, 2), generator=g)  # a 1x2 grid, K = 3
    images = torch.randint(0, 6, (80, 1, 2, 2), generator=g)  # L = 6 in bins {0,1,2} and {3,4,5}
    prior = Smoothing(0.1 + torch.rand(4, 6, generator=g), 0.5, bins=2)
    c = distill_tree(codes, images, 3, 6, (1, 2, 2), (1, 2), prior)
    c.meta["leaf_bins"] = 2
    leaves = c.log_params().leaves.exp().detach().double()  # [S, L, K]
    assert torch.allclose(leaves.sum(1), torch.ones(4, 3, dtype=torch.float64), atol=1e-6)
    v, owner = images.reshape(80, 4), c.owner
    counts = torch.zeros(4, 6, 3, dtype=torch.float64)
    for i, lv, k in itertools.product(range(4), range(6), range(3)):
        counts[i, lv, k] = ((v[:, i] == lv) & (codes[:, owner[i]] == k)).sum()
    for i, lv, k in itertools.product(range(4), range(6), range(3)):
        b = slice(0, 3) if lv < 3 else slice(3, 6)
        beta = (counts[i, b, k] + prior.leaf[i, b]).sum() / (counts[i, :, k] + prior.leaf[i]).sum()
        split = counts[i].sum(1) + prior.leaf[i]
        assert abs(float(leaves[i, lv, k] - beta * split[lv] / split[b].sum())) < 1e-6
    assert c.num_params == 2 + 1 * 3 * 2 + 4 * 3 * 1 + 4 * 4
    untied = distill_tree(codes, images, 3, 6, (1, 2, 2), (1, 2), Smoothing(prior.leaf, 0.5, bins=6))
    plain = distill_tree(codes, images, 3, 6, (1, 2, 2), (1, 2), Smoothing(prior.leaf, 0.5))
    assert torch.allclose(untied.log_params().leaves, plain.log_params().leaves)


def test_smoothing_centres_on_the_pixel_marginal() -> None:
    images = torch.tensor([[0, 2], [0, 2], [0, 1]])
    s = smoothing(images, 3, leaf=2.0, edge=0.3)
    assert torch.allclose(s.leaf[0], 2.0 * 3 * torch.tensor([4.0, 1, 1]) / 6)
    assert s.edge == 0.3


def test_em_lowers_training_nll_and_keeps_the_best_validation_iteration() -> None:
    g = torch.Generator().manual_seed(2)
    images = (torch.rand(300, 1, 4, 4, generator=g) < torch.linspace(0.1, 0.9, 16).view(1, 1, 4, 4)).long()
    images[::2] = 1 - images[::2]  # two clusters of images
    codes = torch.randint(0, 3, (300, 4), generator=g)  # uninformative codes: EM must find the structure
    prior = smoothing(images[:200], 2, leaf=0.1, edge=0.1)
    c = distill_tree(codes[:200], images[:200], 3, 2, (1, 4, 4), (2, 2), prior)
    start = bpd(c, images[:200])
    with pytest.raises(ValueError, match="max_seconds must be a positive number"):
        em_fit(c, images[:200], images[200:], prior, iterations=6, max_seconds=0.0)
    result = em_fit(c, images[:200], images[200:], prior, iterations=6, patience=6, batch_size=64, max_seconds=600)
    train = [h["train_bpd"] for h in result.history]
    assert abs(train[0] - start) < 1e-6 and train[-1] < train[0] - 0.05
    assert all(b <= a + 1e-3 for a, b in itertools.pairwise(train))  # MAP-EM: the NLL (≈) never rises
    assert abs(bpd(c, images[200:]) - result.best_val_bpd) < 1e-6


def test_em_with_tied_leaves_never_raises_the_training_nll() -> None:
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 8, (200, 1, 4, 4), generator=g)
    images[::2] = (images[::2] * torch.linspace(0, 1, 16).view(1, 1, 4, 4)).long()  # two kinds of images
    codes = torch.randint(0, 3, (200, 4), generator=g)
    prior = smoothing(images, 8, leaf=0.1, edge=0.1, bins=4)
    c = distill_tree(codes, images, 3, 8, (1, 4, 4), (2, 2), prior)
    result = em_fit(c, images, images[:50], prior, iterations=5, patience=5, batch_size=64)
    train = [h["train_bpd"] for h in result.history]
    assert train[-1] < train[0] - 0.01 and all(b <= a + 1e-4 for a, b in itertools.pairwise(train))
    tied = c.log_params().leaves.exp()
    assert torch.allclose(tied[:, 0] / tied[:, 1], (tied[:, 0] / tied[:, 1])[:, :1].expand(-1, 3), rtol=1e-4)


def test_adam_route_lowers_validation_nll_and_resumes(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    images = (torch.rand(240, 1, 4, 4, generator=g) < torch.linspace(0.1, 0.9, 16).view(1, 1, 4, 4)).long()
    images[::2] = 1 - images[::2]
    codes = torch.randint(0, 3, (240, 4), generator=g)
    c = distill_tree(codes[:160], images[:160], 3, 2, (1, 4, 4), (2, 2), smoothing(images[:160], 2))
    cfg = TrainConfig(epochs=3, patience=3, lr=0.05, batch_size=32, progress=False)
    result = adam_fit(c, images[:160], images[160:], cfg, tmp_path / "tree.pt")
    assert result.best_val_loss < result.start_val_loss - 0.02
    assert abs(bpd(c, images[160:]) * math.log(2) - result.best_val_loss) < 1e-5
    again = adam_fit(c, images[:160], images[160:], cfg, tmp_path / "tree.pt")  # finished: returns at once
    assert again.epochs_run == result.epochs_run and again.best_val_loss == result.best_val_loss


def test_patch_kmeans_finds_each_positions_clusters() -> None:
    g = torch.Generator().manual_seed(4)
    owner = patch_owner((1, 3, 4), (1, 2))  # two patches of 6 pixels
    truth = torch.randint(0, 3, (200, 2), generator=g)  # each image: one of 3 patterns per patch
    patterns = torch.tensor([[0, 0, 0, 0, 0, 0], [7, 7, 7, 0, 0, 0], [0, 7, 0, 7, 0, 7]])
    images = torch.zeros(200, 12, dtype=torch.long)
    images[:, owner == 0], images[:, owner == 1] = patterns[truth[:, 0]], patterns[truth[:, 1]]
    images = (images + torch.randint(0, 2, images.shape, generator=g)).clamp_max(7)  # noise
    codes, centroids = patch_kmeans_codes(images, owner, 3, 8, iterations=10, generator=g)
    assert codes.shape == (200, 2) and centroids.shape == (2, 3, 6)
    for j in range(2):  # the partition is the truth's up to a relabelling
        pairs = set(zip(codes[:, j].tolist(), truth[:, j].tolist()))
        assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3


def test_context_windows_widen_each_patch_by_its_neighbours() -> None:
    owner = patch_owner((1, 4, 4), (2, 2))  # four 2x2 patches
    images = torch.arange(16).view(1, 1, 4, 4).expand(3, 1, 4, 4).clone()
    x = _patches(images, owner, 16, context=1, context_weight=0.5)  # [M, n, P]: 3x3 windows
    assert x.shape == (4, 3, 9)
    first = {round(float(v) * 15, 3) for v in x[0, 0]}  # window of the top-left patch: rows 0-2, cols 0-2
    assert first == {0, 1, 5, 4, 2 * 0.5, 6 * 0.5, 8 * 0.5, 9 * 0.5, 10 * 0.5}
    plain = _patches(images, owner, 16)
    assert plain.shape == (4, 3, 4) and sorted((plain[3, 0] * 15).round().tolist()) == [10, 11, 14, 15]
    g = torch.Generator().manual_seed(6)
    codes, _ = patch_kmeans_codes(images, owner, 1, 16, iterations=2, generator=g, context=1)
    assert codes.shape == (3, 4)
    with pytest.raises(ValueError, match="context windows need images shaped"):
        patch_kmeans_codes(images.view(3, 16), owner, 1, 16, context=1)
