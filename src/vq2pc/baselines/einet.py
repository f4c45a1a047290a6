"""EiNet baseline: a Poon–Domingos einsum network built and compiled with libcirkit.

EiNets: Peharz et al. 2020, "Einsum Networks: Fast and Scalable Learning of Tractable
Probabilistic Circuits", arXiv:2004.06231. The distillation paper's EiNets (App. C) use "a
single-layer Poon–Domingos image decomposition structure" with piece counts {2, 4, 7} and
I ∈ {1, 5, 10, 20, 30, 40} input distributions per patch. We build exactly that with libcirkit 0.3.1 (GPLv3, an
optional dependency: ``pip install libcirkit==0.3.1`` or ``pip install vq2pc[baselines]``):

* region graph ``PoonDomingos(image_shape, delta=[[H/p, W/p] for p in pieces])``.
  ``pieces`` is EiNet's ``pd_num_pieces`` (its reference code builds the graph with
  ``pd_delta = [[height / d, width / d] for d in pd_num_pieces]``): ``pieces=(4,)``
  on 28×28 cuts at multiples of 7, leaving 4×4 patches of 7×7 pixels. The paper's
  ``{{2}, {4}, {7}}`` is that list-of-lists syntax: one piece count per model.
* every patch is a fully factorized product of per-pixel input layers with
  ``num_input_units`` units (Gaussian, std in ``[min_std, max_std]`` by a scaled
  sigmoid, means initialized in ``[0, 1]``; or categorical over ``levels``);
* every partition is a Tucker layer (``sum_product="tucker"``: Kronecker product
  then dense sum = EiNet's einsum layer ``W_kij x_i y_j``), regions with several
  partitions get a mixing layer, as in EiNet;
* trained by maximum likelihood with Adam (:func:`train_einet`).

Why a default-compiled libcirkit circuit returns one constant (-708.40) for every
input and does not learn: libcirkit's ``lse-sum`` semiring (the default of
``cirkit.pipeline.compile``) clamps the result of every sum and product layer from
below at ``LOG_CLAMP_MIN = -708.3964`` (``log`` of the smallest normal float64;
``cirkit/backend/torch/semiring.py``, ``utils.py``). An image's log-density is a
sum of S per-pixel terms; at initialization (means ~ N(0, 1), std ~ 0.5) it is
far below -708 for 784 pixels, so the root (and every large region) is clamped to
exactly -708.3964 whatever the input, and ``clamp_min`` has zero gradient there.
It is not the input layout ([B, D] is required and checked), not folding, not the
stddev parameterization: 8×8 images already give -708.40 for x = 3 and distinct
values for x = 0 or 0.5. The clamp also silently biases legitimate likelihoods
(categorical MNIST images have log P ≈ -500 .. -1500 nats). We therefore compile
with our own semiring ``lse-sum-unclamped`` (the same log-sum-exp algebra without
the clamp, registered with identity morphisms to ``lse-sum``); tests check that
the likelihood depends on the input and that the circuit normalizes.

Queries, all exact:

* ``log_prob(x, mask)``: marginals by integrating the unobserved pixels' input
  units (libcirkit's integration semantics: their log output becomes the layer's
  log partition function, 0);
* ``conditional_mean`` / ``conditional_probs``: the circuit is multilinear in the
  input units of each variable, so with ``δ_u`` the derivative of ``log p(x_o)``
  with respect to the log output of input unit ``u`` of an integrated variable,
  ``p(x_i | x_o) = Σ_u δ_u p_u(x_i)`` (Σ_u δ_u = 1) — one backward pass gives every
  pixel's conditional marginal, hence E[x_i | x_o];
* ``inpaint``: the conditional mean (Gaussian) or each hidden pixel's conditional
  mode (categorical; per-pixel marginal modes, not a joint MAP);
* ``sample``: exact ancestral sampling of our own (:meth:`EiNet.sample`), one selector
  pass per chunk at the cost of a ``log_prob`` batch. libcirkit 0.3.1's ``SamplingQuery``
  is not used: its Kronecker sampler is broken (it assumes an extra axis and fails with
  "index out of bounds") and it pads every unit's sample to all S variables, O(units·S)
  state per sample per fold — 72.6 s per 1,000 MNIST samples on 2 cores, against 0.5 s
  here. Conditional sampling is not offered.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vq2pc.baselines.einet_config import SUM_PRODUCT_LAYERS, EiNetConfig
from vq2pc.baselines.regions import learn_tree, region_graph
from vq2pc.circuit.cirkit import UNCLAMPED_SEMIRING, FoldedEvaluator, require_cirkit
from vq2pc.core.checkpoint import SavableModel, load_checkpoint
from vq2pc.core.discretized import level_log_prob
from vq2pc.core.validate import check_finite, check_levels, observed_mask, rows
from vq2pc.data.datasets import DataSplits, check_fits
from vq2pc.models.train import TrainConfig, TrainResult, completed_steps, dequantize_once, fit, step_dequantizer

__all__ = ["EiNetConfig", "EiNet", "DiscretizedEiNet", "train_einet", "SUM_PRODUCT_LAYERS"]

_SAMPLE_CHUNK = 1024  # samples per selector pass, fewer where their activations exceed the budget below
_SAMPLE_BUDGET_BYTES = 512 << 20
_TWIN_ROWS = 500  # rows per pass of the discretized twin (QuadGraph-CP-64: ~0.2 GB a layer)


def _build_circuit(cfg: EiNetConfig) -> nn.Module:
    """Symbolic circuit over ``cfg``'s region graph -> folded torch circuit in the unclamped log semiring."""
    require_cirkit()
    from cirkit.pipeline import PipelineContext
    from cirkit.symbolic.initializers import NormalInitializer, UniformInitializer
    from cirkit.symbolic.layers import CategoricalLayer, GaussianLayer
    from cirkit.symbolic.parameters import (
        Parameter,
        ScaledSigmoidParameter,
        TensorParameter,
        mixing_weight_factory,
    )
    from cirkit.templates.utils import Parameterization, parameterization_to_factory

    def std_factory(shape: tuple[int, ...]) -> Any:
        op = ScaledSigmoidParameter(shape, vmin=cfg.min_std, vmax=cfg.max_std)
        return Parameter.from_unary(op, TensorParameter(*shape, initializer=NormalInitializer()))

    def mean_factory(shape: tuple[int, ...]) -> Any:
        return Parameter.from_input(TensorParameter(*shape, initializer=UniformInitializer(0.0, 1.0)))

    if cfg.leaf == "gaussian":
        input_factory = functools.partial(GaussianLayer, mean_factory=mean_factory, stddev_factory=std_factory)
    else:
        input_factory = functools.partial(CategoricalLayer, num_categories=cfg.levels)
    # a PIC's nets give normalized sum weights themselves (and mixing weights must feed their mixing node)
    activation = "none" if cfg.pic_net_dim else "softmax"
    weights = parameterization_to_factory(Parameterization(activation=activation, initialization="normal"))
    symbolic = region_graph(cfg.region_graph, cfg.image_shape, cfg.deltas(), cfg.tree).build_circuit(
        input_factory=input_factory,
        sum_product=cfg.sum_product,
        sum_weight_factory=weights,
        nary_sum_weight_factory=functools.partial(mixing_weight_factory, param_factory=weights),
        num_input_units=cfg.num_input_units,
        num_sum_units=cfg.num_sum_units,
        num_classes=1,
        factorize_multivariate=True,
    )
    # optimize=False: libcirkit's fused Tucker layer has no sampler.
    with (
        torch.random.fork_rng(devices=[]),
        PipelineContext(backend="torch", semiring=UNCLAMPED_SEMIRING, fold=True, optimize=False) as ctx,
    ):
        torch.manual_seed(cfg.seed)
        circuit = ctx.compile(symbolic)
        if cfg.pic_net_dim:
            from cirkit.backend.torch.parameters.pic import pc2qpc

            pc2qpc(circuit, integration_method="trapezoidal", net_dim=cfg.pic_net_dim)
        return circuit


class EiNet(SavableModel, nn.Module):
    """A libcirkit circuit (Poon–Domingos EiNet, QuadGraph, HCLT, ...) trained by likelihood over
    ``S = C·H·W`` pixels (model space, see data.py)."""

    checkpoint_kind = "einet"
    config_class = EiNetConfig

    def __init__(self, cfg: EiNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.circuit = _build_circuit(cfg)
        self.evaluator = FoldedEvaluator(self.circuit)

    @property
    def num_params(self) -> int:
        """Trainable scalar parameters of the circuit."""
        return sum(p.numel() for p in self.circuit.parameters())

    @property
    def device(self) -> torch.device:
        return next(self.circuit.parameters()).device

    # --- inputs -------------------------------------------------------------------
    def _prepare(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``x [B,S]`` or ``[B,C,H,W]`` -> ``[B,S]`` with hidden entries zeroed; mask -> bool ``[B,S]``."""
        s = self.cfg.num_variables
        x = rows(x, s).to(self.device, torch.float32)
        if mask is None:
            seen, name = x, "x"
        else:
            mask = observed_mask(mask, x.shape[0], s).to(self.device)
            x = torch.where(mask, x, torch.zeros_like(x))
            seen, name = x[mask], "x (observed entries)"
        if self.cfg.leaf == "categorical":
            check_levels(seen, self.cfg.levels, name)
        else:
            check_finite(name, seen)
        return x, mask

    def _evaluate(
        self, x: Tensor, hidden: Tensor | None, probes: dict | None = None, levels: int | None = None
    ) -> Tensor:
        """``[B]`` log p(x_o); hidden variables' input units output their log partition (0).

        With ``probes``, a zero tensor with gradient is added to every input layer's
        log output and stored under the layer (for conditional marginals). With ``levels``, ``x``
        holds integer levels and every Gaussian input unit gives its discretized twin's log-probability.
        """
        from cirkit.backend.torch.layers import TorchGaussianLayer, TorchInputLayer
        from cirkit.backend.torch.semiring import LSESumSemiring

        def layer_fn(layer: nn.Module, *inputs: Tensor) -> Tensor:
            if levels is not None and isinstance(layer, TorchGaussianLayer):  # x (F, B, 1), parameters (F, K)
                lp = level_log_prob(inputs[0], layer.mean()[:, None], layer.stddev()[:, None], levels, "gaussian")
                out = layer.semiring.map_from(lp, LSESumSemiring)  # (F, B, K)
            else:
                out = layer(*inputs)  # (F, B, K)
            if not isinstance(layer, TorchInputLayer):
                return out
            if hidden is not None:
                out = torch.where(hidden[:, layer.scope_idx[:, 0]].T.unsqueeze(-1), layer.integrate(), out)
            if probes is not None:
                probes[layer] = torch.zeros_like(out, requires_grad=True)
                out = out + probes[layer]
            return out

        return self.evaluator(x, layer_fn)[0, :, 0]  # (O, B, K) -> (B,)

    # --- queries --------------------------------------------------------------------
    def log_prob(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B]`` log p(x), or the exact log marginal of the observed entries (mask True = observed)."""
        x, mask = self._prepare(x, mask)
        return self._evaluate(x, None if mask is None else ~mask)

    def forward(self, x: Tensor) -> Tensor:
        return self.log_prob(x)

    def discretized(self, levels: int) -> DiscretizedEiNet:
        """The exact ``levels``-level twin of a Gaussian EiNet (see :class:`DiscretizedEiNet`)."""
        if self.cfg.leaf != "gaussian":
            raise ValueError(f"only a Gaussian EiNet has a discretized twin, not a {self.cfg.leaf} one")
        return DiscretizedEiNet(self, levels)

    def _conditional(self, x: Tensor, mask: Tensor) -> list[tuple[Any, Tensor]]:
        """Per input layer, ``δ [F, B, K]``: unit weights of the conditionals ``p(x_i | x_o)``."""
        x, mask = self._prepare(x, mask)
        probes: dict = {}
        with torch.enable_grad():
            lp = self._evaluate(x, ~mask, probes)
            grads = torch.autograd.grad(lp.sum(), list(probes.values()))
        return list(zip(probes.keys(), grads))

    def conditional_probs(self, x: Tensor, mask: Tensor) -> Tensor:
        """Categorical leaves: ``[B, S, L]`` exact p(x_i = l | x_o) for every pixel (hidden ones are meaningful)."""
        if self.cfg.leaf != "categorical":
            raise ValueError("conditional_probs needs categorical leaves; use conditional_mean")
        b = x.shape[0]
        out = torch.zeros(b, self.cfg.num_variables, self.cfg.levels, device=self.device)
        for layer, delta in self._conditional(x, mask):
            probs = _categorical_log_probs(layer).exp()  # (F, K, L)
            out.index_add_(1, layer.scope_idx[:, 0], torch.einsum("fbk,fkl->bfl", delta, probs))
        return out

    def conditional_mean(self, x: Tensor, mask: Tensor) -> Tensor:
        """``[B, S]`` exact E[x_i | x_o] for hidden pixels (levels for categorical); observed copied."""
        xp, mp = self._prepare(x, mask)
        if self.cfg.leaf == "categorical":
            levels = torch.arange(self.cfg.levels, device=self.device, dtype=torch.float32)
            mean = self.conditional_probs(xp, mp) @ levels
        else:
            mean = torch.zeros_like(xp)
            for layer, delta in self._conditional(xp, mp):
                mean.index_add_(1, layer.scope_idx[:, 0], torch.einsum("fbk,fk->bf", delta, layer.mean()))
        return torch.where(mp, xp, mean.detach())

    def inpaint(self, x: Tensor, mask: Tensor) -> Tensor:
        """``[B, S]``: conditional mean (Gaussian) or per-pixel conditional mode (categorical) of hidden pixels."""
        if self.cfg.leaf == "gaussian":
            return self.conditional_mean(x, mask)
        xp, mp = self._prepare(x, mask)
        return torch.where(mp, xp, self.conditional_probs(xp, mp).argmax(-1).float())

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``[n, S]`` exact ancestral samples, drawn in chunks (seeded by ``generator``).

        One pass over the circuit per chunk, costing what ``log_prob`` of a batch costs:
        every sum unit draws one child per sample (inverse CDF of its weights) and
        passes that child's value on (a gather), product layers add as usual, and every
        input unit outputs 0 with gradient. Each node appears at most once in an induced
        tree (decomposability), so independent per-unit draws are ancestral sampling; the
        gradient of the root with respect to the input outputs is 1 exactly on the units
        of each sample's induced tree, one per variable, and selects its leaf draw.
        """
        if int(n) < 1:
            raise ValueError(f"n must be a positive number of samples, got {n}")
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        dev = self.device
        units = sum(layer.num_folds * layer.num_output_units for layer in self.circuit.layers)  # per sample
        chunk = max(1, min(_SAMPLE_CHUNK, _SAMPLE_BUDGET_BYTES // (8 * units)))  # float32 values and gradients
        parts = []
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, int(n), chunk):
                parts.append(self._sample_chunk(min(chunk, int(n) - start)))
        return torch.cat(parts)

    def _sample_chunk(self, m: int) -> Tensor:
        """``[m, S]`` samples from one selector pass (see :meth:`sample`)."""
        from cirkit.backend.torch.layers import TorchInputLayer, TorchSumLayer

        probes: dict = {}

        def layer_fn(layer: nn.Module, *inputs: Tensor) -> Tensor:
            if isinstance(layer, TorchInputLayer):  # a placeholder input: only the gradient matters
                probes[layer] = torch.zeros(
                    layer.num_folds, m, layer.num_output_units, device=self.device, requires_grad=True
                )
                return probes[layer]
            if isinstance(layer, TorchSumLayer):
                return _select_children(layer, *inputs)
            return layer(*inputs)

        with torch.enable_grad():
            root = self.evaluator(torch.zeros(m, self.cfg.num_variables, device=self.device), layer_fn)
            chosen = torch.autograd.grad(root.sum(), list(probes.values()))
        out = torch.empty(m, self.cfg.num_variables, device=self.device)
        with torch.no_grad():
            for layer, on in zip(probes, chosen):  # on: (F, m, K), one-hot over K
                draws = layer.sample(m).float()  # (F, K, m)
                out[:, layer.scope_idx[:, 0]] = torch.einsum("fmk,fkm->mf", on, draws)
        return out


class DiscretizedEiNet:
    """A Gaussian EiNet whose input units are replaced by their discretized twins (``P(v) = Φ((v+1)/L) −
    Φ(v/L)`` in the units' data space, open end bins: :mod:`vq2pc.core.discretized`); the rest of the
    circuit as trained. A normalized distribution over integer levels: its BPD is the exact discrete BPD,
    never above the EiNet's dequantized BPD. Shares the EiNet's parameters."""

    def __init__(self, einet: EiNet, levels: int) -> None:
        self.einet, self.levels = einet, int(levels)

    @property
    def num_params(self) -> int:
        return self.einet.num_params

    @property
    def device(self) -> torch.device:
        return self.einet.device

    def log_prob(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B]`` log P(v_o) of integer levels ``x`` (exact marginals, as :meth:`EiNet.log_prob`), in chunks
        of rows: the report scores a twin's whole test set in one call."""
        x, mask = self.einet._prepare(x, mask)
        check_levels(x if mask is None else x[mask], self.levels, "x" if mask is None else "x (observed entries)")
        hidden = [None] * len(x.split(_TWIN_ROWS)) if mask is None else (~mask).split(_TWIN_ROWS)
        chunks = zip(x.split(_TWIN_ROWS), hidden)
        return torch.cat([self.einet._evaluate(xb, hb, levels=self.levels) for xb, hb in chunks])


def _select_children(layer: Any, x: Tensor) -> Tensor:
    """Sum layer as a sampler: ``x [F, H, m, Ki]`` -> ``[F, m, Ko]``, each unit's value at one child drawn
    from its weights (``weight [F, Ko, H·Ki]``, rows summing to 1)."""
    x = x.permute(0, 2, 1, 3).flatten(2)  # (F, m, H·Ki)
    cdf = layer.weight().detach().cumsum(-1)  # (F, Ko, H·Ki)
    u = torch.rand(*cdf.shape[:2], x.shape[1], device=x.device) * cdf[..., -1:]  # (F, Ko, m)
    child = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
    return torch.gather(x, 2, child.transpose(1, 2))


def _categorical_log_probs(layer: Any) -> Tensor:
    """``[F, K, L]`` normalized log-probabilities of a libcirkit categorical input layer."""
    if layer.logits is None:
        return torch.log(layer.probs())
    return torch.log_softmax(layer.logits(), -1)


def _nll_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """Mean NLL in nats per dimension of a batch in model space."""
    x = batch[0].flatten(1)
    return -model.log_prob(x).mean() / x.shape[1]


def _resumed_tree(checkpoint: str | Path | None) -> tuple[int, ...] | None:
    """The Chow–Liu tree an interrupted HCLT run learned (its checkpoint's config): a resume does not learn
    it again (minutes on MNIST)."""
    if checkpoint is None or not Path(checkpoint).exists():
        return None
    tree = (load_checkpoint(checkpoint, "einet").get("meta") or {}).get("config", {}).get("tree")
    return None if tree is None else tuple(tree)


def train_einet(
    splits: DataSplits, cfg: EiNetConfig, train_cfg: TrainConfig, checkpoint: str | Path | None = None
) -> tuple[EiNet, TrainResult]:
    """Fit an EiNet by maximum likelihood (Adam, :func:`train.fit`, kind ``einet``) on ``splits``; training
    batches are dequantized per step (:func:`~vq2pc.models.train.step_dequantizer`: the same noise whatever
    the number of ranks, and after a resume), the validation set once."""
    check_fits(cfg.image_shape, cfg.levels, splits)
    cfg = replace(cfg, seed=train_cfg.seed)
    if cfg.region_graph == "chow-liu-tree" and cfg.tree is None:
        cfg = replace(cfg, tree=_resumed_tree(checkpoint) or learn_tree(splits.train_x, cfg.leaf, cfg.levels))
    model = EiNet(cfg)
    first = completed_steps(checkpoint, "einet", len(splits.train_x), train_cfg.batch_size)
    val = (dequantize_once(splits.val_x, cfg.leaf, cfg.levels, train_cfg.seed),)
    result = fit(
        model,
        _nll_loss,
        (splits.train_x,),
        val,
        train_cfg,
        checkpoint=checkpoint,
        kind="einet",
        meta={"config": asdict(cfg)},
        desc="einet" if cfg.region_graph == "poon-domingos" else cfg.region_graph,
        prepare=step_dequantizer(cfg.leaf, cfg.levels, train_cfg.seed, first),
    )
    return model, result
