"""Categorical pixels parametrized by a decoder's last convolution: ``HeadCategorical``.

A VQ-VAE decoder with a categorical head ends in one convolution from ``H`` feature channels to ``L``
logits per pixel. For ``N`` components ``n`` with features ``f_n [H, h, w]`` (the decoder's activations
before that convolution) the leaves are

    ``log p(x_s = l | n) = conv(f_n)[l, s] + b[l] − log Z[n, s]``,   ``log Z[n, s] = logsumexp_l (...)``,

exactly the decoder's categorical leaves, stored with ``H`` numbers per pixel and component instead of
``L`` (``H = 32``, ``L = 256`` on MNIST: 8× less; N = 50,000 components take 5 GB instead of 40). The
log-likelihood of an image is linear in the features: ``Σ_s conv(f_n)[x_s, s] = ⟨f_n, fold(W[x])⟩``
(``fold`` is the adjoint of the convolution's ``unfold``), so a batch's ``[B, N]`` log-likelihoods are one
``[B, H·S] × [H·S, N]`` matrix product (:mod:`vq2pc.circuit.kernels_head`). Everything that needs the
leaves of particular components (sampling, means, modes) computes their logits by the convolution, a
chunk of components at a time. One image channel, a square kernel of odd size, stride 1, "same" padding.

**Warped copies.** With ``warps [D, S, S]`` (linear maps of the feature maps, :mod:`vq2pc.core.warps`:
shifts, rotations) the leaf holds ``D·N`` components, component ``d·N + n`` with features ``f_n @ T_d``
and its own normalizers; only the ``N`` feature maps are stored. Its log-likelihoods stay one product,
``⟨G, f_n T_d⟩ = ⟨G T_dᵀ, f_n⟩``: the image side is warped back once per warp.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from vq2pc.core.leaves import CIRCUIT_LEAF_KINDS, Categorical, Leaf
from vq2pc.core.validate import check_finite, check_levels

__all__ = ["HeadCategorical"]

CHUNK_ELEMENTS = 1 << 24
"""Logits computed at once (components × S × L) when the leaves of many components are materialized."""


class HeadCategorical(Leaf):
    """``features [N, H, h, w]``, ``weight [L, H, k, k]``, ``bias [L]``, optional ``warps [D, S, S]`` and
    ``log_norm [D·N, S]`` (``S = h·w``, ``D = 1`` without warps; the normalizers are computed when not
    given). Batch shape ``[D·N, S]``; data: integer levels ``0..L-1``."""

    kind = "head-categorical"
    batch_tensors = ("log_norm",)
    """The tensors whose leading axes are the batch shape ``[N, S]`` (the file format checks them; the
    features have one row per component too, the head is shared)."""

    def __init__(
        self,
        features: Tensor,
        weight: Tensor,
        bias: Tensor,
        log_norm: Tensor | None = None,
        warps: Tensor | None = None,
    ) -> None:
        if features.dim() != 4 or weight.dim() != 4 or bias.dim() != 1:
            raise ValueError(
                "need features [N, H, h, w], weight [L, H, k, k] and bias [L]; got "
                f"{tuple(features.shape)}, {tuple(weight.shape)}, {tuple(bias.shape)}"
            )
        k = weight.shape[-1]
        if (
            weight.shape[1] != features.shape[1]
            or weight.shape[2] != k
            or k % 2 == 0
            or bias.shape[0] != weight.shape[0]
        ):
            raise ValueError(
                f"head weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not fit features "
                f"{tuple(features.shape)} (a square odd kernel over the H feature channels)"
            )
        s = features.shape[2] * features.shape[3]
        if warps is not None and (warps.dim() != 3 or tuple(warps.shape[1:]) != (s, s) or warps.shape[0] < 1):
            raise ValueError(f"warps must have shape [D, S, S] with S = {s}, got {tuple(warps.shape)}")
        self.features, self.weight, self.bias, self.warps = features, weight, bias, warps
        self.log_norm = self._log_norms() if log_norm is None else log_norm
        if tuple(self.log_norm.shape) != (self.num_components, s):
            raise ValueError(
                f"log_norm must have shape [D·N, S] = {(self.num_components, s)}, got {tuple(self.log_norm.shape)}"
            )

    # --- structure ---------------------------------------------------------------
    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> HeadCategorical:
        """The leaf of the dict :meth:`tensors` returned (a circuit file's)."""
        missing = [n for n in ("features", "weight", "bias", "log_norm") if n not in tensors]
        if missing:
            raise ValueError(f"{cls.kind} leaf needs tensors features, weight, bias, log_norm; missing {missing}")
        t = tensors
        return cls(t["features"], t["weight"], t["bias"], t["log_norm"], t.get("warps"))

    def tensors(self) -> dict[str, Tensor]:
        out = {"features": self.features, "weight": self.weight, "bias": self.bias, "log_norm": self.log_norm}
        return out if self.warps is None else {**out, "warps": self.warps}

    @property
    def num_components(self) -> int:
        """``D·N``."""
        return self.num_warps * int(self.features.shape[0])

    def __getitem__(self, idx) -> HeadCategorical:
        if self.warps is None:
            return HeadCategorical(self.features[idx], self.weight, self.bias, self.log_norm[idx])
        rows = torch.arange(self.num_components, device=self.features.device)[idx].reshape(-1)
        return HeadCategorical(self.component_features(rows), self.weight, self.bias, self.log_norm[rows])

    @property
    def batch_shape(self) -> torch.Size:
        return self.log_norm.shape

    @property
    def data_kind(self) -> str:
        return "categorical"

    @property
    def num_levels(self) -> int:
        """``L``."""
        return int(self.weight.shape[0])

    @property
    def num_warps(self) -> int:
        """``D`` (1 without warps)."""
        return 1 if self.warps is None else int(self.warps.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        """``(h, w)``: the image's pixel grid."""
        return int(self.features.shape[2]), int(self.features.shape[3])

    def check(self) -> None:
        for name, t in self.tensors().items():
            check_finite(name, t)

    def validate_data(self, x: Tensor, name: str = "x") -> None:
        check_levels(x, self.num_levels, name)

    # --- the leaves of components ------------------------------------------------
    def component_features(self, rows: Tensor) -> Tensor:
        """``[n, H, h, w]`` features of components ``rows [n]`` (indices in ``0..D·N-1``), warped."""
        n = int(self.features.shape[0])
        if self.warps is None:
            return self.features[rows]
        out = self.features.new_empty(rows.shape[0], *self.features.shape[1:])
        which = rows // n
        for d in which.unique().tolist():  # one product per warp present (D is small)
            at = (which == d).nonzero().squeeze(1)
            src = self.features[rows[at] % n]
            out[at] = (src.flatten(2) @ self.warps[d]).view_as(src)
        return out

    def logits(self, features: Tensor) -> Tensor:
        """``[n, S, L]`` unnormalized logits of the components with ``features [n, H, h, w]``."""
        out = F.conv2d(features, self.weight, self.bias, padding=self.weight.shape[-1] // 2)  # [n, L, h, w]
        return out.flatten(2).transpose(1, 2)

    def _over_logits(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """``fn`` of the logits ``[n, S, L]`` of consecutive chunks of components, concatenated on dim 0."""
        s = self.features.shape[2] * self.features.shape[3]
        step = max(1, CHUNK_ELEMENTS // max(1, s * self.num_levels))
        rows = torch.arange(self.num_components, device=self.features.device)
        parts = [fn(self.logits(self.component_features(r))) for r in rows.split(step)]
        return torch.cat(parts) if parts else self.features.new_zeros(0, s)

    def _chunks(self, fn: Callable[[Categorical], Tensor]) -> Tensor:
        """``fn`` of the categorical leaves of consecutive chunks of components, concatenated on dim 0."""
        return self._over_logits(lambda z: fn(Categorical(z)))

    def _log_norms(self) -> Tensor:
        return self._over_logits(lambda z: torch.logsumexp(z, -1))

    def categorical(self) -> Categorical:
        """The same leaves as a :class:`Categorical` (``[D·N, S, L]``: materializes the whole table)."""
        return Categorical(self._over_logits(lambda z: z))

    def pixel_log_table(self, i: int) -> Tensor:
        """``[L, N]`` log-probabilities of every level at pixel ``i``: the head's window around the pixel (what
        the codec codes with)."""
        h, w = self.grid
        pad = self.weight.shape[-1] // 2
        r, c = divmod(int(i), w)
        r0, r1, c0, c1 = max(0, r - pad), min(h, r + pad + 1), max(0, c - pad), min(w, c + pad + 1)
        taps = self.weight[:, :, r0 - r + pad : r1 - r + pad, c0 - c + pad : c1 - c + pad].flatten(1)  # [L, H·kr·kc]
        if self.warps is None:
            window = self.features[:, :, r0:r1, c0:c1].flatten(1)  # [N, H·kr·kc]
        else:  # each warp's window from the source pixels it reads: [D·N, H·kr·kc]
            cells = (torch.arange(r0, r1)[:, None] * w + torch.arange(c0, c1)[None, :]).reshape(-1)
            flat = self.features.flatten(2)
            window = torch.cat([self._warped_cells(flat, t[:, cells]) for t in self.warps]).flatten(1)
        return (torch.addmm(self.bias, window, taps.T) - self.log_norm[:, i : i + 1]).T

    @staticmethod
    def _warped_cells(flat: Tensor, columns: Tensor) -> Tensor:
        """``flat [N, H, S] @ columns [S, m]`` through the source pixels the columns read (a warp's columns
        are sparse: bilinear weights): ``[N, H, m]``."""
        src = columns.abs().sum(1).nonzero().squeeze(1)
        return flat[:, :, src] @ columns[src]

    # --- distribution ------------------------------------------------------------
    def log_prob(self, x: Tensor) -> Tensor:
        """Element-wise log mass ``[..., N, S]`` (materializes the ``[N, S, L]`` table: for a few components;
        circuits compute their log-likelihoods by the kernel instead)."""
        return self.categorical().log_prob(x)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        return self._chunks(lambda c: c.sample(generator))

    def mean(self) -> Tensor:
        return self._chunks(lambda c: c.mean())

    def mode(self) -> Tensor:
        return self._chunks(lambda c: c.mode())


CIRCUIT_LEAF_KINDS[HeadCategorical.kind] = HeadCategorical  # circuit files may hold this leaf
