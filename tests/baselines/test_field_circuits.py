"""The field's circuits (QuadGraph, QuadTree, HCLT) built with libcirkit: exact on tiny cases, trainable,
saved with their structure, and reachable from a run config and the `train-baseline` verb."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from scipy import stats

from vq2pc.data import load_dataset
from vq2pc.models.train import TrainConfig

einet = pytest.importorskip("vq2pc.baselines.einet", reason="the field's circuits need libcirkit==0.3.1")
from vq2pc.baselines.regions import learn_tree  # noqa: E402  (libcirkit present from here on)

FAST = TrainConfig(epochs=2, patience=5, lr=1e-2, batch_size=50, progress=False)


def _all_images(levels: int, s: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(levels), repeat=s)), dtype=torch.float32)


def _chain_data(n: int = 400, s: int = 6, seed: int = 0) -> torch.Tensor:
    """Binary pixels where pixel i copies pixel i-1 with probability 0.9: the Chow–Liu tree is the chain."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, s, dtype=torch.long)
    x[:, 0] = torch.randint(0, 2, (n,), generator=g)
    for i in range(1, s):
        flip = torch.rand(n, generator=g) < 0.1
        x[:, i] = torch.where(flip, 1 - x[:, i - 1], x[:, i - 1])
    return x


def test_chow_liu_tree_recovers_a_chain():
    tree = learn_tree(_chain_data(), "categorical", 2)
    edges = {frozenset((i, p)) for i, p in enumerate(tree) if p >= 0}
    assert tree.count(-1) == 1
    assert edges == {frozenset((i, i + 1)) for i in range(5)}


@pytest.mark.parametrize(
    "region_graph, sum_product",
    [("quad-graph", "cp"), ("quad-tree-4", "tucker"), ("quad-tree-2", "cp-t"), ("chow-liu-tree", "cp")],
)
def test_field_circuits_normalize_and_sample_exactly(region_graph, sum_product):
    shape, levels = (1, 2, 3), 2
    tree = learn_tree(_chain_data(s=6), "categorical", levels) if region_graph == "chow-liu-tree" else None
    cfg = einet.EiNetConfig(
        shape,
        leaf="categorical",
        levels=levels,
        region_graph=region_graph,
        tree=tree,
        sum_product=sum_product,
        num_input_units=3,
        num_sum_units=3,
        seed=1,
    )
    model = einet.EiNet(cfg)
    lp = model.log_prob(_all_images(levels, 6)).detach().double()
    assert torch.logsumexp(lp, 0).item() == pytest.approx(0.0, abs=1e-5)
    assert lp.std() > 0.05  # depends on the input
    n = 20000
    draws = model.sample(n, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount((draws.long() * 2 ** torch.arange(5, -1, -1)).sum(1), minlength=64).double()
    probs = lp.exp() / lp.exp().sum()
    assert stats.chisquare(counts.numpy(), (probs * n).numpy()).pvalue > 1e-3


@pytest.mark.parametrize("leaf", ["categorical", "gaussian"])
@pytest.mark.parametrize("region_graph", ["quad-graph", "poon-domingos", "chow-liu-tree"])
def test_folded_evaluator_equals_libcirkit_evaluation(region_graph, leaf):
    """Values and parameter gradients of the gather-once evaluator equal libcirkit's own, marginals included."""
    x = torch.randint(0, 8, (48, 1, 6, 6))
    tree = learn_tree(x, leaf, 8) if region_graph == "chow-liu-tree" else None
    cfg = einet.EiNetConfig(
        (1, 6, 6), leaf=leaf, levels=8, region_graph=region_graph, tree=tree, pieces=(2, 3), num_input_units=3,
        num_sum_units=3, seed=3,
    )  # fmt: skip
    model = einet.EiNet(cfg)
    xb = x.flatten(1).float() if leaf == "categorical" else x.flatten(1).float() / 8
    hidden = torch.rand(xb.shape) < 0.3

    from cirkit.backend.torch.layers import TorchInputLayer

    def marginal(layer, *inputs):  # hidden pixels' input units integrate to 1 (log 0)
        out = layer(*inputs)
        if not isinstance(layer, TorchInputLayer):
            return out
        return torch.where(hidden[:, layer.scope_idx[:, 0]].T.unsqueeze(-1), torch.zeros_like(out), out)

    for fn in (None, marginal):
        ours = model.evaluator(xb, fn)
        theirs = model.circuit.evaluate(xb, module_fn=fn)
        assert torch.equal(ours, theirs)
        params = list(model.parameters())
        for a, b in zip(torch.autograd.grad(ours.sum(), params), torch.autograd.grad(theirs.sum(), params)):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_pic_normalizes_samples_exactly_and_only_with_cp_layers():
    """A probabilistic integral circuit (libcirkit's pc2qpc over QuadGraph): exact over all 2^8 images, its
    samples follow its probabilities, its nets are the parameters, and Tucker layers are refused."""
    cfg = einet.EiNetConfig(
        (1, 2, 4), leaf="categorical", levels=2, region_graph="quad-graph", sum_product="cp", num_input_units=4,
        num_sum_units=4, pic_net_dim=16, seed=1,
    )  # fmt: skip
    model = einet.EiNet(cfg)
    lp = model.log_prob(_all_images(2, 8)).detach().double()
    assert torch.logsumexp(lp, 0).item() == pytest.approx(0.0, abs=1e-5) and lp.std() > 0.05
    assert all("net" in name for name, _ in model.circuit.named_parameters())
    n = 20000
    draws = model.sample(n, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount((draws.long() * 2 ** torch.arange(7, -1, -1)).sum(1), minlength=256).double()
    probs = lp.exp() / lp.exp().sum()
    assert (probs * n).min() > 5  # every cell holds enough mass for the chi-square test
    assert stats.chisquare(counts.numpy(), (probs * n).numpy()).pvalue > 1e-3
    with pytest.raises(ValueError, match="PIC"):
        einet.EiNetConfig((1, 2, 4), leaf="categorical", levels=2, sum_product="tucker", pic_net_dim=16)


def test_field_circuit_marginal_equals_brute_force_sum():
    cfg = einet.EiNetConfig(
        (1, 2, 2),
        leaf="categorical",
        levels=3,
        region_graph="quad-graph",
        sum_product="cp",
        num_input_units=3,
        num_sum_units=3,
        seed=2,
    )
    model = einet.EiNet(cfg)
    x = _all_images(3, 4)
    joint = model.log_prob(x).detach().double().exp()
    mask = torch.tensor([[True, False, True, False]])
    got = model.log_prob(torch.tensor([[2.0, 0.0, 1.0, 0.0]]), mask).detach().double().exp()
    want = joint[(x[:, 0] == 2) & (x[:, 2] == 1)].sum()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_hclt_learns_its_tree_trains_and_reloads_the_same_structure(tmp_path, monkeypatch):
    digits = load_dataset("digits", limit=150)
    cfg = einet.EiNetConfig(
        digits.image_shape,
        leaf="categorical",
        levels=digits.levels,
        region_graph="chow-liu-tree",
        sum_product="cp",
        num_input_units=3,
        num_sum_units=3,
    )
    x = digits.val_x.flatten(1).float()
    before = (
        -einet.EiNet(
            einet.EiNetConfig(**{**cfg.__dict__, "tree": learn_tree(digits.train_x, "categorical", digits.levels)})
        )
        .log_prob(x)
        .mean()
        .item()
    )
    ck = tmp_path / "hclt.pt"
    model, result = einet.train_einet(digits, cfg, FAST, checkpoint=ck)
    assert model.cfg.tree is not None and len(model.cfg.tree) == digits.train_x[0].numel()
    assert result.epochs_run == 2 and -model.log_prob(x).mean().item() < before - 1.0
    loaded = einet.EiNet.load(ck)
    assert loaded.cfg.tree == model.cfg.tree
    monkeypatch.setattr(einet, "learn_tree", lambda *a, **k: pytest.fail("a resume learned the tree again"))
    assert einet.train_einet(digits, cfg, FAST, checkpoint=ck)[0].cfg.tree == model.cfg.tree
    assert torch.allclose(loaded.log_prob(x[:5]), model.log_prob(x[:5]))


def test_bad_structures_are_refused_with_one_clear_error():
    with pytest.raises(ValueError, match=r"^region_graph must be 'poon-domingos', .* got 'quad'$"):
        einet.EiNetConfig((1, 2, 2), region_graph="quad")
    with pytest.raises(ValueError, match="needs its tree"):
        einet.EiNet(einet.EiNetConfig((1, 2, 2), region_graph="chow-liu-tree"))
    with pytest.raises(ValueError, match="one parent per variable"):
        einet.EiNetConfig((1, 2, 2), region_graph="chow-liu-tree", tree=(-1, 0, 1))


def test_config_circuits_are_checked(tmp_path):
    from vq2pc.pipeline.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("baselines: {circuits: [{region_graph: quad-graph, sum_product: cp, units: 8}]}\n")
    assert load_config(path).baselines.circuits[0].units == 8
    path.write_text("baselines: {circuits: [{region_graph: pd, units: 8}]}\n")
    with pytest.raises(ValueError, match=r"config\.baselines\.circuits\[0\]\.region_graph must be .* got 'pd'"):
        load_config(path)


def test_train_baseline_verb_writes_and_prints_its_row(tmp_path, capsys):
    from vq2pc.cli import main

    argv = [
        "train-baseline",
        "--limit",
        "120",
        "--region-graph",
        "quad-tree-4",
        "--units",
        "2",
        "--epochs",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["family"] == "QuadTree" and row["num_params"] > 0 and row["train_epochs"] == 1
    assert 0 < row["test_bpd"] < 10 and 0 < row["val_bpd"] < 10
    assert json.loads((tmp_path / "quad-tree-4-cp-2.json").read_text())["test_bpd"] == row["test_bpd"]
    per_image = np.load(tmp_path / "quad-tree-4-cp-2.test_bpd.npy")  # one BPD per test image, same mean
    assert per_image.shape == (row["test_images"],) and per_image.mean() == pytest.approx(row["test_bpd"], rel=1e-9)
    # Gaussian leaves and another seed go to their own files in the same folder, with the discrete BPD beside
    assert main([*argv, "--leaf", "gaussian", "--seed", "1"]) == 0
    gauss = json.loads((tmp_path / "quad-tree-4-cp-2-gaussian-seed1.json").read_text())
    assert gauss["leaf"] == "gaussian" and gauss["seed"] == 1 and gauss["test_bpd_discrete"] < gauss["test_bpd"]
    assert json.loads((tmp_path / "quad-tree-4-cp-2.json").read_text())["test_bpd"] == row["test_bpd"]
