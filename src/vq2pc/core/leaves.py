"""Per-variable (pixel) distributions: the input units of the circuit.

ONE definition serves both the VQ-VAE's pixel head (training loss) and the
distilled circuit (inference), so the density that is trained is the density
that is queried.

Shapes: a leaf holds parameters for a batch of "rows" (images while training,
components ``N`` inside a circuit) over ``S`` variables:

* ``Gaussian(mean, std)``      mean, std: ``[..., S]``; data are reals (``[0, 1]`` after dequantization)
* ``Categorical(logits)``      logits: ``[..., S, L]``; data are integer levels ``0..L-1``
* ``Bernoulli(logits)``        logits: ``[..., S]``; data are ``{0, 1}``

``log_prob(x)`` is element-wise: ``x`` broadcasts against the parameters'
batch shape and the result is ``[..., S]`` (sum over the last axis for the
log-likelihood of a row).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from vq2pc.core.random import categorical, normal, uniform
from vq2pc.core.validate import check_binary, check_finite, check_levels

LOG_2PI = math.log(2.0 * math.pi)

__all__ = ["Leaf", "Gaussian", "Categorical", "Bernoulli", "leaf_from_tensors", "LEAF_KINDS", "check_leaf_kind",
           "cap_std", "component_log_likelihoods"]


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


LEAF_KINDS: dict[str, type[Leaf]] = {cls.kind: cls for cls in (Gaussian, Categorical, Bernoulli)}
"""The pixel models by name: the one list of leaf kinds (configs, CLI choices and checks read it)."""


def check_leaf_kind(kind: str) -> str:
    """Return ``kind`` or raise one ``ValueError`` naming the known leaf kinds."""
    if kind not in LEAF_KINDS:
        raise ValueError(f"unknown leaf kind {kind!r}; expected one of {list(LEAF_KINDS)}")
    return kind


def leaf_from_tensors(kind: str, tensors: dict[str, Tensor]) -> Leaf:
    """Rebuild a leaf from ``kind`` and the dict that ``Leaf.tensors()`` returned."""
    cls = LEAF_KINDS[check_leaf_kind(kind)]
    names = {"gaussian": ("mean", "std"), "categorical": ("logits",), "bernoulli": ("logits",)}[kind]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{kind} leaf needs tensors {list(names)}; missing {missing}")
    return cls(*[tensors[n] for n in names])


def cap_std(leaf: Leaf, std_max: float | None) -> Leaf:
    """``leaf`` with every Gaussian std ``σ`` replaced by ``σ·c / (σ + c)`` for ``c = std_max``: a smooth cap
    that stays below ``c``, leaves ``σ ≪ c`` nearly unchanged (``c/2`` at ``σ = c``) and keeps a gradient
    everywhere. Differentiable; the leaf itself when ``std_max`` is None."""
    if std_max is None:
        return leaf
    if not isinstance(leaf, Gaussian):
        raise ValueError(f"std_max applies to Gaussian leaves only, not {leaf.kind} ones")
    return Gaussian(leaf.loc, leaf.scale * std_max / (leaf.scale + std_max))


def component_log_likelihoods(leaf: Leaf, x: Tensor) -> Tensor:
    """``log p(x_b | θ_m)`` summed over the S variables: leaf batch ``[M, S]``, ``x [B, S]`` -> ``[B, M]``.

    Differentiable in the leaf parameters. Gaussian leaves use the quadratic form as one matrix
    product in float64 (stds near 1e-3 make the float32 terms cancel badly). Categorical leaves index
    their ``[M, S·L]`` log-probabilities, so the backward pass scatters into ``[M, S·L]``; a broadcast
    gather would scatter into ``[B, M, S, L]`` (13 GB at B = M = 128 on MNIST). Others broadcast."""
    if isinstance(leaf, Categorical):
        M, S, L = leaf.logits.shape
        flat = (x.long() + torch.arange(S, device=x.device) * L).reshape(-1)  # [B·S] positions in S·L
        return leaf.logits.reshape(M, S * L)[:, flat].reshape(M, x.shape[0], S).sum(-1).t()
    if isinstance(leaf, Gaussian):
        prec = leaf.scale.double().pow(-2)  # [M, S]
        mu = leaf.loc.double()
        xd = x.double()
        const = (-0.5 * mu.pow(2) * prec - leaf.scale.double().log()).sum(1) - 0.5 * LOG_2PI * x.shape[1]
        quad = torch.cat([xd.pow(2), xd], 1) @ torch.cat([-0.5 * prec, mu * prec], 1).t()  # [B, M]
        return (quad + const).to(leaf.loc.dtype)
    return leaf.log_prob(x.unsqueeze(1)).sum(-1)
