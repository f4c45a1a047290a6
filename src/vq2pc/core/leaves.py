"""Per-variable (pixel) distributions: the input units of the circuit.

ONE definition serves both the VQ-VAE's pixel head (training loss) and the
distilled circuit (inference), so the density that is trained is the density
that is queried.

Shapes: a leaf holds parameters for a batch of "rows" (images while training,
components ``N`` inside a circuit) over ``S`` variables:

* ``Gaussian(mean, std)``      mean, std: ``[..., S]``; data are reals (``[0, 1]`` after dequantization)
* ``Categorical(logits)``      logits: ``[..., S, L]``; data are integer levels ``0..L-1``
* ``Bernoulli(logits)``        logits: ``[..., S]``; data are ``{0, 1}``
* ``DiscretizedGaussian(mean, scale, levels)`` / ``DiscretizedLogistic(...)``  mean, scale: ``[..., S]``;
  data are integer levels ``0..L-1``, ``P(v) = F((v+1)/L) − F(v/L)`` (:mod:`vq2pc.core.discretized`): the
  exact discrete twin of a Gaussian leaf (``Gaussian.discretized(L)``), whose BPD it never exceeds

``log_prob(x)`` is element-wise: ``x`` broadcasts against the parameters'
batch shape and the result is ``[..., S]`` (sum over the last axis for the
log-likelihood of a row).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from vq2pc.core import discretized as disc
from vq2pc.core.random import categorical, normal, uniform
from vq2pc.core.validate import check_binary, check_finite, check_levels

LOG_2PI = math.log(2.0 * math.pi)

__all__ = [
    "Leaf",
    "Gaussian",
    "Categorical",
    "Bernoulli",
    "Discretized",
    "DiscretizedGaussian",
    "DiscretizedLogistic",
    "leaf_from_tensors",
    "LEAF_KINDS",
    "CIRCUIT_LEAF_KINDS",
    "check_leaf_kind",
    "discretize",
]


class Leaf:
    """Base class of the per-variable distributions (see module docstring)."""

    kind: ClassVar[str] = ""

    # --- structure ---------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """The parameter tensors by name (what ``save`` writes)."""
        raise NotImplementedError

    @property
    def batch_shape(self) -> torch.Size:
        raise NotImplementedError

    @property
    def data_kind(self) -> str:
        """The data space ``log_prob`` reads, as ``data.to_model_space`` names it (the leaf kind, except
        that discretized leaves read integer levels, like ``"categorical"``)."""
        return self.kind

    @property
    def num_variables(self) -> int:
        """``S``, the number of variables (pixels × channels)."""
        return int(self.batch_shape[-1])

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    def map(self, fn) -> Leaf:
        """A leaf of the same kind with ``fn`` applied to every parameter tensor."""
        return type(self)(*[fn(t) for t in self.tensors().values()])

    def __getitem__(self, idx) -> Leaf:
        """Index the leading (row/component) axes, e.g. ``leaf[10:20]``."""
        return self.map(lambda t: t[idx])

    def to(self, *args, **kwargs) -> Leaf:
        return self.map(lambda t: t.to(*args, **kwargs))

    # --- distribution ------------------------------------------------------------
    def log_prob(self, x: Tensor) -> Tensor:
        """Element-wise log density/mass, ``[..., S]``."""
        raise NotImplementedError

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """One draw per variable, ``[..., S]``."""
        raise NotImplementedError

    def mean(self) -> Tensor:
        """Expected value per variable, ``[..., S]`` (levels for categorical)."""
        raise NotImplementedError

    def mode(self) -> Tensor:
        """Most probable value per variable, ``[..., S]``."""
        raise NotImplementedError

    def validate_data(self, x: Tensor, name: str = "x") -> None:
        """Raise ``ValueError`` if ``x`` is outside this leaf's support."""
        check_finite(name, x)


class Gaussian(Leaf):
    """Independent normals ``N(mean, std²)`` per variable."""

    kind = "gaussian"

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        if mean.shape != std.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and std {tuple(std.shape)} must have the same shape")
        if mean.dim() < 1:
            raise ValueError("mean must have at least one axis (S)")
        self.loc = mean
        self.scale = std

    def tensors(self) -> dict[str, Tensor]:
        return {"mean": self.loc, "std": self.scale}

    @property
    def batch_shape(self) -> torch.Size:
        return self.loc.shape

    def check(self) -> None:
        check_finite("mean", self.loc)
        check_finite("std", self.scale)
        if (self.scale <= 0).any():
            raise ValueError("std must be > 0 everywhere")

    def log_prob(self, x: Tensor) -> Tensor:
        z = (x - self.loc) / self.scale
        return -0.5 * z * z - torch.log(self.scale) - 0.5 * LOG_2PI

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        eps = normal(tuple(self.loc.shape), generator, self.loc.device, self.loc.dtype)
        return self.loc + self.scale * eps

    def mean(self) -> Tensor:
        return self.loc

    def mode(self) -> Tensor:
        return self.loc

    def discretized(self, levels: int) -> DiscretizedGaussian:
        """The exact ``levels``-level twin: ``P(v) = Φ(((v+1)/L − μ)/σ) − Φ((v/L − μ)/σ)``, open end bins,
        the same tensors (no copy). It puts on ``v`` the mass this density puts on ``v``'s dequantization bin
        (more at the ends), so its BPD is never above the dequantized BPD (Jensen)."""
        return DiscretizedGaussian(self.loc, self.scale, levels)


class Categorical(Leaf):
    """Independent categoricals over ``L`` levels per variable (``logits [..., S, L]``)."""

    kind = "categorical"

    def __init__(self, logits: Tensor) -> None:
        if logits.dim() < 2:
            raise ValueError("logits must have shape [..., S, L]")
        self.logits = torch.log_softmax(logits, dim=-1)

    def tensors(self) -> dict[str, Tensor]:
        return {"logits": self.logits}

    @property
    def batch_shape(self) -> torch.Size:
        return self.logits.shape[:-1]

    @property
    def num_levels(self) -> int:
        """``L``."""
        return int(self.logits.shape[-1])

    def check(self) -> None:
        if torch.isnan(self.logits).any():
            raise ValueError("logits contain NaN")

    def validate_data(self, x: Tensor, name: str = "x") -> None:
        check_levels(x, self.num_levels, name)

    def log_prob(self, x: Tensor) -> Tensor:
        idx = x.long().unsqueeze(-1)
        logits = self.logits
        shape = torch.broadcast_shapes(idx.shape[:-1], logits.shape[:-1])
        logits = logits.expand(*shape, self.num_levels)
        return torch.gather(logits, -1, idx.expand(*shape, 1)).squeeze(-1)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        return categorical(self.logits.exp(), generator).to(self.logits.dtype)

    def mean(self) -> Tensor:
        levels = torch.arange(self.num_levels, device=self.logits.device, dtype=self.logits.dtype)
        return (self.logits.exp() * levels).sum(-1)

    def mode(self) -> Tensor:
        return self.logits.argmax(-1).to(self.logits.dtype)


class Bernoulli(Leaf):
    """Independent Bernoullis per variable (``logits [..., S]``, data in ``{0, 1}``)."""

    kind = "bernoulli"

    def __init__(self, logits: Tensor) -> None:
        if logits.dim() < 1:
            raise ValueError("logits must have at least one axis (S)")
        self.logits = logits

    def tensors(self) -> dict[str, Tensor]:
        return {"logits": self.logits}

    @property
    def batch_shape(self) -> torch.Size:
        return self.logits.shape

    def check(self) -> None:
        if torch.isnan(self.logits).any():
            raise ValueError("logits contain NaN")

    def validate_data(self, x: Tensor, name: str = "x") -> None:
        check_binary(x, name)

    def log_prob(self, x: Tensor) -> Tensor:
        # log σ(l) for x = 1, log σ(-l) for x = 0, written stably.
        return -torch.nn.functional.softplus(torch.where(x > 0.5, -self.logits, self.logits))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        u = uniform(tuple(self.logits.shape), generator, self.logits.device, self.logits.dtype)
        return (u < torch.sigmoid(self.logits)).to(self.logits.dtype)

    def mean(self) -> Tensor:
        return torch.sigmoid(self.logits)

    def mode(self) -> Tensor:
        return (self.logits > 0).to(self.logits.dtype)


class Discretized(Leaf):
    """Independent discretized location-scale distributions over ``L`` levels (``mean, scale [..., S]``,
    data: integer levels): see :mod:`vq2pc.core.discretized`. ``cdf`` names ``F``."""

    cdf: ClassVar[str] = ""

    def __init__(self, mean: Tensor, scale: Tensor, levels: int) -> None:
        if mean.shape != scale.shape:
            raise ValueError(f"mean {tuple(mean.shape)} and scale {tuple(scale.shape)} must have the same shape")
        if mean.dim() < 1:
            raise ValueError("mean must have at least one axis (S)")
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ValueError(f"levels must be an integer >= 2, got {levels!r}")
        self.loc, self.scale, self.levels = mean, scale, levels

    def tensors(self) -> dict[str, Tensor]:
        return {"mean": self.loc, "scale": self.scale}

    def map(self, fn) -> Discretized:
        return type(self)(fn(self.loc), fn(self.scale), self.levels)

    @property
    def batch_shape(self) -> torch.Size:
        return self.loc.shape

    @property
    def data_kind(self) -> str:
        return "categorical"

    @property
    def num_levels(self) -> int:
        """``L``."""
        return self.levels

    def check(self) -> None:
        check_finite("mean", self.loc)
        check_finite("scale", self.scale)
        if (self.scale <= 0).any():
            raise ValueError("scale must be > 0 everywhere")

    def validate_data(self, x: Tensor, name: str = "x") -> None:
        check_levels(x, self.levels, name)

    def log_prob(self, x: Tensor) -> Tensor:
        return disc.level_log_prob(x, self.loc, self.scale, self.levels, self.cdf)

    def pixel_log_table(self, i: int) -> Tensor:
        """``[L, N]`` log-probabilities of every level at pixel ``i`` (``mean, scale [N, S]``): what the codec
        codes with."""
        v = torch.arange(self.levels, dtype=self.loc.dtype, device=self.loc.device).unsqueeze(1)  # [L, 1]
        return disc.level_log_prob(v, self.loc[:, i], self.scale[:, i], self.levels, self.cdf)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """A continuous draw ``μ + s·F⁻¹(u)``, binned: exactly ``P`` (the end bins take the tails)."""
        tiny = torch.finfo(self.loc.dtype).tiny
        u = uniform(tuple(self.loc.shape), generator, self.loc.device, self.loc.dtype).clamp_min(tiny)
        y = self.loc + self.scale * disc.quantile(u, self.cdf)
        return torch.floor(y * self.levels).clamp(0, self.levels - 1)

    def mean(self) -> Tensor:
        return disc.survival_sum(self.loc, self.scale, self.levels, self.cdf)

    def mode(self) -> Tensor:
        """The most probable level: the bin holding ``μ`` beats every other inner bin (a symmetric unimodal
        ``F``, bins of equal width), so only it and the two open end bins are compared (ties: lowest)."""
        top = self.levels - 1
        inner = (torch.ceil(self.loc * self.levels) - 1).clamp(0, top)  # μ on an edge: the lower bin (a tie)
        cand = torch.stack([torch.zeros_like(inner), inner, torch.full_like(inner, top)])  # [3, ..., S]
        best = self.log_prob(cand).argmax(0, keepdim=True)
        return cand.gather(0, best).squeeze(0)


class DiscretizedGaussian(Discretized):
    """Discretized normal: ``F = Φ`` (the twin of :class:`Gaussian`, ``Gaussian.discretized``)."""

    kind = "discretized-gaussian"
    cdf = "gaussian"


class DiscretizedLogistic(Discretized):
    """Discretized logistic (PixelCNN++'s pixel model): ``F = sigmoid``."""

    kind = "discretized-logistic"
    cdf = "logistic"


LEAF_KINDS: dict[str, type[Leaf]] = {cls.kind: cls for cls in (Gaussian, Categorical, Bernoulli)}
"""The pixel models by name: the one list of decoder heads (configs, CLI choices and checks read it)."""

CIRCUIT_LEAF_KINDS: dict[str, type[Leaf]] = {
    **LEAF_KINDS,
    DiscretizedGaussian.kind: DiscretizedGaussian,
    DiscretizedLogistic.kind: DiscretizedLogistic,
}
"""Every leaf kind a circuit may hold (its file format reads it): the heads and the discretized leaves,
which a circuit gets from a Gaussian head (:func:`discretize`); :mod:`vq2pc.core.head_leaf` adds its own."""


def check_leaf_kind(kind: str) -> str:
    """Return ``kind`` or raise one ``ValueError`` naming the known leaf kinds."""
    if kind not in LEAF_KINDS:
        raise ValueError(f"unknown leaf kind {kind!r}; expected one of {list(LEAF_KINDS)}")
    return kind


def leaf_from_tensors(kind: str, tensors: dict[str, Tensor], levels: int = 0) -> Leaf:
    """Rebuild a leaf from ``kind`` and the dict that ``Leaf.tensors()`` returned (``levels``: ``L`` of a
    discretized leaf, which holds no tensor of that size)."""
    if kind not in CIRCUIT_LEAF_KINDS:
        raise ValueError(f"unknown leaf kind {kind!r}; expected one of {list(CIRCUIT_LEAF_KINDS)}")
    cls = CIRCUIT_LEAF_KINDS[kind]
    names = {"gaussian": ("mean", "std"), "categorical": ("logits",), "bernoulli": ("logits",)}.get(
        kind, ("mean", "scale")
    )
    if hasattr(cls, "from_tensors"):  # a leaf that names its own tensors
        return cls.from_tensors(tensors)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{kind} leaf needs tensors {list(names)}; missing {missing}")
    extra = (levels,) if issubclass(cls, Discretized) else ()
    return cls(*[tensors[n] for n in names], *extra)


def discretize(leaf: Leaf, levels: int) -> Leaf:
    """The discrete twin of a Gaussian leaf (:meth:`Gaussian.discretized`); a discretized leaf of ``levels``
    levels as it is; ``ValueError`` for any other leaf."""
    if isinstance(leaf, Gaussian):
        return leaf.discretized(levels)
    if isinstance(leaf, Discretized) and leaf.levels == levels:
        return leaf
    raise ValueError(
        f"only Gaussian leaves have a discretized twin, not {leaf.kind} ones"
        + (f" of {leaf.levels} levels (asked for {levels})" if isinstance(leaf, Discretized) else "")
    )
