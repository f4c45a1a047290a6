"""``ClassMixture``: a class-aware circuit ``p̂(x, c) = Σ_n w_{n,c} Π_i p(x_i | z_n)``.

The prior is class-conditional, ``p(z) = Σ_c p(c) p(z | c)``; a distilled circuit keeps only the
marginal ``w_n = Σ_c w_{n,c}``. A :class:`ClassMixture` holds that circuit (a :class:`MixtureCircuit`,
or the exact model :class:`ExactModel` over all ``K^{HW}`` latents with ``w_{z,c} = p(c) p(z | c)``)
plus the class log-weights ``[N, C]`` (:func:`~vq2pc.circuit.class_weights.class_weights`). It is a
smooth, decomposable circuit (a class indicator under the sum), so every query stays exact:

* ``class_posterior(x, mask)``: ``[B, C]`` log p(c | x_o) — classification with missing pixels is exact
  marginalization (no imputation);
* ``log_prob(x, c, mask)``: log p(x_o | c), or log p(x_o) without ``c``;
* ``sample(n, c=...)``, and given ``x``/``mask``: a draw of p(x_u | x_o, c); ``conditional_mean`` and
  ``map`` given a class (``map`` without a class maximizes over ``(n, c)`` jointly).

Every query computes the circuit's likelihood matrix ``ℓ [b, N]`` once per block of rows (latent
chunks for the exact model) and reduces it with small ``[N, C]`` products
(:func:`~vq2pc.circuit.class_weights.class_joint`): no loop over classes or components.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from vq2pc.circuit.class_weights import class_joint, normalize_joint, whole_space_joint
from vq2pc.circuit.distill import decode_leaf
from vq2pc.circuit.exact import ExactModel
from vq2pc.circuit.io import check_sample_args, prepare_input, read_extra, write_circuit
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.circuit.streaming import (
    RunningArgmax,
    Scratch,
    SoftmaxWeightedSum,
    add_gumbel_,
)
from vq2pc.core.checkpoint import CheckpointError
from vq2pc.core.devices import flush_denormals
from vq2pc.core.leaves import Leaf
from vq2pc.core.random import uniform
from vq2pc.latents.enumerate import index_to_codes

__all__ = ["CLASS_TENSOR", "ClassMixture", "load_circuit"]

CLASS_TENSOR = "class_log_weights"
"""Name of the ``[N, C]`` class log-weights in a circuit file (a plain reader ignores it)."""

_MIB = 1 << 20
Block = tuple[slice, int, Tensor, MixtureCircuit]


class ClassMixture:
    """A circuit with class log-weights ``log w_{n,c}`` (normalized jointly over ``(n, c)``).

    Args:
        model: a :class:`MixtureCircuit` (``N`` components) or an :class:`ExactModel` (``N = K^{HW}``).
        class_log_weights: ``[N, C]``; required for a circuit; for the exact model the default is exact,
            ``log p(c) + log p(z | c)`` of every latent from its prior. A circuit whose weights are not the
            class marginal ``Σ_c w_{n,c}`` is rebuilt with it (same leaves).
    """

    def __init__(self, model: MixtureCircuit | ExactModel, class_log_weights: Tensor | None = None) -> None:
        if not isinstance(model, (MixtureCircuit, ExactModel)):
            raise ValueError(f"ClassMixture needs a MixtureCircuit or an ExactModel, got {type(model).__name__}")
        exact = isinstance(model, ExactModel)
        if class_log_weights is None:
            if not exact:
                raise ValueError("a MixtureCircuit needs class_log_weights [N, C] (see circuit.class_weights)")
            class_log_weights = _exact_joint(model)
        joint = normalize_joint(class_log_weights)
        if joint.shape[0] != len(model):
            raise ValueError(f"class_log_weights has {joint.shape[0]} rows; the model has N = {len(model)}")
        device = model.device
        joint = joint.to(device)
        marginal = torch.logsumexp(joint, 1)  # [N] float64
        if not exact and not _same_weights(marginal, model.log_weights):
            model = MixtureCircuit(
                model.leaf,
                marginal.to(model.log_weights.dtype),
                memory_budget_mib=model.memory_budget_mib,
                meta=model.meta,
            )
        self.model, self.exact = model, exact
        dtype = torch.float32 if exact else model.log_weights.dtype
        cond = (joint - marginal[:, None]).nan_to_num(nan=-math.inf)  # log p(c | n); zero-weight rows: -inf
        if not exact:  # the circuit's own (float-rounded) weights are the marginal its scores carry
            marginal = model.log_weights.double()
            joint = marginal[:, None] + cond
        self.log_weights = joint.to(dtype)  # [N, C]
        self.log_marginal = marginal.to(dtype)  # [N]
        self.log_cond = cond.to(dtype)  # [N, C]
        self.log_class_prior = torch.logsumexp(joint, 0).to(dtype)  # [C] p̂(c) = Σ_n w_{n,c}
        self.memory_budget_mib = float(model.memory_budget_mib)
        self._R = None if exact else cond.exp().to(device)  # [N, C] float64 p(c | n)
        template = (
            model.leaf[:1]
            if not exact
            else decode_leaf(
                model.vqvae,
                torch.zeros((1, *model.latent_hw), dtype=torch.long, device=device),
                std_floor=model.std_floor,
            )
        )
        self._fill = template.mode()[0]
        self._template = template
        self._mode_logp: Tensor | None = None

    # --- structure ------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.log_weights.shape[0])

    @property
    def num_classes(self) -> int:
        """``C``."""
        return int(self.log_weights.shape[1])

    @property
    def num_variables(self) -> int:
        """``S``."""
        return self.model.num_variables

    @property
    def num_params(self) -> int:
        """The circuit's parameters plus the ``N·C`` class weights (instead of its ``N`` weights)."""
        return self.model.num_params + len(self) * (self.num_classes - 1)

    @property
    def device(self) -> torch.device:
        return self.log_weights.device

    @property
    def meta(self) -> dict:
        return self.model.meta if not self.exact else {}

    def __repr__(self) -> str:
        return f"ClassMixture({self.model!r}, C={self.num_classes})"

    def to(self, device: str | torch.device) -> ClassMixture:
        """A copy on ``device`` (a circuit's; an exact model is moved with its VQ-VAE and prior instead)."""
        if self.exact:
            raise ValueError("move an ExactModel-based ClassMixture by building it on the device (ExactModel(device=))")
        return ClassMixture(self.model.to(device), self.log_weights.double().to(device))

    # --- input ----------------------------------------------------------------------
    def _prepare(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return prepare_input(x, mask, self._template, self._fill)

    def check_classes(self, c: int | Tensor, rows: int) -> Tensor:
        """``[rows]`` long class indices from an int or a ``[rows]`` integer tensor (``ValueError`` naming
        the problem)."""
        t = torch.as_tensor(c)
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"class must be an integer or an integer tensor, got {t.dtype}")
        if t.dim() == 0:
            t = t.expand(rows)
        if tuple(t.shape) != (rows,):
            raise ValueError(f"class has shape {tuple(t.shape)}; expected one class per row, [{rows}], or one int")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
            bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
            raise ValueError(
                f"class index {bad} is out of range: the circuit has C = {self.num_classes} classes "
                f"(0..{self.num_classes - 1})"
            )
        t = t.long().to(self.device)
        empty = torch.isneginf(self.log_class_prior[t])
        if bool(empty.any()):
            raise ValueError(
                f"class {int(t[empty][0])} has no weight in this circuit (no component was selected for it)"
            )
        return t

    # --- blocks of the likelihood matrix ----------------------------------------------
    def _blocks(self, x: Tensor, mask: Tensor | None) -> Iterator[Block]:
        """``(rows, n0, L, circuit)``: ``L [b, n] = log w_n + log p(x_o | n)`` for components ``n0 : n0 + n``
        of ``circuit`` (the circuit itself, or a latent chunk of the exact model); rows inside, chunks outside."""
        B = x.shape[0]
        if not self.exact:  # the circuit's scores log w_n + ℓ, its marginal weights being log_marginal
            for b0, b1, s, _ in self.model.score_blocks(x, mask, extra_row_bytes=16 * len(self)):
                yield slice(b0, b1), 0, s, self.model
            return
        step = max(1, min(B, 500))
        for n0, chunk in self.model.chunks(step, "ExM classes"):
            for a in range(0, B, step):
                r = slice(a, min(a + step, B))
                L = chunk.log_likelihoods_prepared(x[r], None if mask is None else mask[r])
                yield r, n0, L.add_(self.log_marginal[n0 : n0 + len(chunk)]), chunk

    def _bias(self, n0: int, n: int, c: Tensor | None, r: slice) -> Tensor | None:
        """``[b, n]`` log p(c_b | n) of the rows' classes, or None (class marginalized)."""
        return None if c is None else self.log_cond[n0 : n0 + n].T[c[r]]

    # --- likelihoods ----------------------------------------------------------------
    @torch.no_grad()
    def log_joint(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B, C]`` float64 log p̂(x_o, c) for every class."""
        x, mask = self._prepare(x, mask)
        return self._joint(x, mask)

    def _joint(self, x: Tensor, mask: Tensor | None) -> Tensor:
        out = torch.full((x.shape[0], self.num_classes), -math.inf, dtype=torch.float64, device=self.device)
        limit, scratch = int(self.memory_budget_mib * _MIB // 4), Scratch()
        with flush_denormals(self.device):
            for r, n0, L, chunk in self._blocks(x, mask):
                cond = self.log_cond[n0 : n0 + len(chunk)]
                R = self._R if not self.exact else cond.double().exp()
                part = class_joint(L, cond, R, limit, scratch)
                out[r] = part if self.exact is False else torch.logaddexp(out[r], part)
        return out

    def class_posterior(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B, C]`` log p(c | x_o) (the circuit's dtype); each row log-sum-exps to 0."""
        joint = self.log_joint(x, mask)
        return (joint - torch.logsumexp(joint, 1, keepdim=True)).to(self.log_weights.dtype)

    def log_prob(self, x: Tensor, c: int | Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """``[B]`` log p(x_o | c) for classes ``c`` (an int or ``[B]``), or log p(x_o) when ``c`` is None."""
        xp, mp = self._prepare(x, mask)
        cls = None if c is None else self.check_classes(c, xp.shape[0])
        joint = self._joint(xp, mp)
        if cls is None:
            return torch.logsumexp(joint, 1).to(self.log_weights.dtype)
        given = joint.gather(1, cls[:, None]).squeeze(1) - self.log_class_prior.double()[cls]
        return given.to(self.log_weights.dtype)

    # --- conditionals -----------------------------------------------------------------
    @torch.no_grad()
    def conditional_mean(self, x: Tensor, mask: Tensor | None = None, c: int | Tensor | None = None) -> Tensor:
        """``[B, S]`` E[x | x_o, c] (E[x | x_o] without ``c``); observed entries are copied through."""
        if c is None:
            return self.model.conditional_mean(x, mask)
        xp, mp = self._prepare(x, mask)
        cls = self.check_classes(c, xp.shape[0])
        accs: dict[int, SoftmaxWeightedSum] = {}
        for r, n0, L, chunk in self._blocks(xp, mp):
            acc = accs.setdefault(r.start, SoftmaxWeightedSum(torch.float64 if self.exact else None))
            acc.add(L.add_(self._bias(n0, L.shape[1], cls, r)), chunk.component_means())
        cm = torch.cat([accs[k].result() for k in sorted(accs)]).to(xp.dtype)
        return cm if mp is None else torch.where(mp, xp, cm)

    def _argmax(
        self,
        x: Tensor,
        mask: Tensor | None,
        cls: Tensor | None,
        generator: torch.Generator | None,
        gumbel: bool,
        extra: Callable[[Tensor, int, slice], Tensor] | None = None,
    ) -> Tensor:
        """``[B]`` argmax_n of ``L + log p(c | n)`` (+ ``extra(L, n0, rows)``, + Gumbel noise: a posterior draw)."""
        best: dict[int, RunningArgmax] = {}
        scratch = Scratch()
        for r, n0, L, _chunk in self._blocks(x, mask):
            bias = self._bias(n0, L.shape[1], cls, r)
            s = L if bias is None else L.add_(bias)
            if extra is not None:
                s = s.add_(extra(s, n0, r))
            if gumbel:
                add_gumbel_(s, generator, scratch)
            best.setdefault(r.start, RunningArgmax()).add(s, n0)
        return torch.cat([best[k].result() for k in sorted(best)])

    def _leaf_rows(self, idx: Tensor) -> Iterator[Leaf]:
        """The leaves ``[b, S]`` of components ``idx [n]``, in memory-bounded blocks."""
        per_row = sum(t[0].numel() * t.element_size() for t in self._template.tensors().values()) * 4
        step = max(1, int(self.memory_budget_mib * _MIB // per_row))
        for a in range(0, len(idx), step):
            part = idx[a : a + step]
            if self.exact:
                yield decode_leaf(
                    self.model.vqvae,
                    index_to_codes(part, self.model.K, *self.model.latent_hw),
                    std_floor=self.model.std_floor,
                )
            else:
                yield self.model.leaf[part]

    @torch.no_grad()
    def sample(
        self,
        n: int | None = None,
        *,
        c: int | Tensor | None = None,
        x: Tensor | None = None,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Exact samples ``[n, S]`` of p(x | c) (``c``: an int or ``[n]``; None: p(x)); with ``x``/``mask``,
        one draw of p(x_u | x_o, c) per row, x_o kept."""
        if c is None:
            return self.model.sample(n, x=x, mask=mask, generator=generator)
        if x is None:
            count = check_sample_args(n, x, mask)
            idx = self._class_components(self.check_classes(c, count), generator)
            return torch.cat([leaf.sample(generator) for leaf in self._leaf_rows(idx)])
        xp, mp = self._prepare(x, mask)
        check_sample_args(n, x, mask, rows=xp.shape[0])
        idx = self._argmax(xp, mp, self.check_classes(c, xp.shape[0]), generator, gumbel=True)
        draw = torch.cat([leaf.sample(generator) for leaf in self._leaf_rows(idx)])
        return draw if mp is None else torch.where(mp, xp, draw)

    def _class_components(self, cls: Tensor, generator: torch.Generator | None) -> Tensor:
        """``[n]`` components drawn from p(n | c_i) = w_{n,c_i} / p̂(c_i): one inverse-CDF search in the
        classes' CDFs laid end to end (class c's CDF shifted by c, so the sequence increases)."""
        N, C = len(self), self.num_classes
        cdf = torch.cumsum((self.log_weights.double() - self.log_class_prior.double()).exp().T, 1)  # [C, N]
        cdf = cdf / cdf[:, -1:].clamp_min(torch.finfo(torch.float64).tiny)
        flat = (cdf + torch.arange(C, device=cdf.device, dtype=cdf.dtype)[:, None]).flatten()
        u = cls.double() + uniform((cls.shape[0],), generator, self.device, torch.float64)
        pos = torch.searchsorted(flat, u, right=True)
        return (pos - cls * N).clamp(0, N - 1)

    @torch.no_grad()
    def map(self, x: Tensor, mask: Tensor | None = None, c: int | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x̂ [B, S], ĉ [B])``: the exact MAP of the joint over (component, x_u) given x_o and the class ``c``
        (or over (component, class, x_u) jointly without ``c``: ĉ is the maximizing class); x_o kept.
        As :meth:`MixtureCircuit.map`, not the marginal MAP of x_u. Not available for the exact model."""
        if self.exact:
            raise ValueError("map is not available for the exact model (ExactModel has no map query)")
        xp, mp = self._prepare(x, mask)
        cls = None if c is None else self.check_classes(c, xp.shape[0])
        if self._mode_logp is None:
            every = torch.arange(len(self), device=self.device)
            parts = [leaf.log_prob(leaf.mode()) for leaf in self._leaf_rows(every)]
            self._mode_logp = torch.cat(parts)  # [N, S] log p(mode | n)
        best_class = self.log_cond.max(1)  # [N]: max_c log p(c | n) and its class

        def extra(s: Tensor, n0: int, r: slice) -> Tensor:
            bonus = 0.0 if mp is None else (~mp[r]).to(s.dtype) @ self._mode_logp[n0 : n0 + s.shape[1]].T
            return bonus + (best_class.values[n0 : n0 + s.shape[1]] if cls is None else 0.0)

        idx = self._argmax(xp, mp, cls, None, gumbel=False, extra=extra)
        mode = xp.clone() if mp is None else torch.where(mp, xp, torch.cat([lf.mode() for lf in self._leaf_rows(idx)]))
        return mode, (best_class.indices[idx] if cls is None else cls)

    # --- persistence ----------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """One circuit file (the circuit's tensors, its weights = the class marginal, and ``class_log_weights``)."""
        if self.exact:
            raise ValueError("an ExactModel is not stored as a file; save its VQ-VAE and prior instead")
        meta = {**self.model.meta, "num_classes": self.num_classes}
        return write_circuit(
            path, self.model.leaf, self.model.log_weights, meta, extra={CLASS_TENSOR: self.log_weights.double()}
        )

    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device | None = None, *, memory_budget_mib: float = 1024
    ) -> ClassMixture:
        """Load a class-aware circuit file (:class:`CheckpointError` for a file without class weights)."""
        circuit = MixtureCircuit.load(path, device, memory_budget_mib=memory_budget_mib)
        extra = read_extra(path, (CLASS_TENSOR,), device)
        if CLASS_TENSOR not in extra:
            raise CheckpointError(
                f"{path} is a circuit without class weights (not class-aware); build them with "
                "vq2pc.class_weights and ClassMixture"
            )
        try:
            return cls(circuit, extra[CLASS_TENSOR])
        except ValueError as exc:
            raise CheckpointError(f"{path}: invalid class weights: {exc}") from None


def _same_weights(marginal: Tensor, log_weights: Tensor, tol: float = 1e-5) -> bool:
    """Whether ``log_weights [N]`` is the class marginal ``[N]`` (same zeros, finite entries within ``tol``:
    float32 round-off of a saved and reloaded circuit)."""
    a, b = marginal.double(), log_weights.double().to(marginal.device)
    if not torch.equal(torch.isinf(a), torch.isinf(b)):
        return False
    finite = torch.isfinite(a)
    return bool(((a - b)[finite].abs() <= tol).all())


def _exact_joint(model: ExactModel) -> Tensor:
    """``[K^{HW}, C]`` float32 log p(c) + log p(z | c) of every latent (lexicographic order, by enumeration)."""
    return whole_space_joint(model.prior).to(model.device)


def load_circuit(
    path: str | Path, device: str | torch.device | None = None, *, memory_budget_mib: float = 1024
) -> MixtureCircuit | ClassMixture:
    """A circuit file as a :class:`ClassMixture` when it holds class weights, else as a :class:`MixtureCircuit`."""
    if CLASS_TENSOR in read_extra(path, (CLASS_TENSOR,)) if Path(path).is_file() else False:
        return ClassMixture.load(path, device, memory_budget_mib=memory_budget_mib)
    return MixtureCircuit.load(path, device, memory_budget_mib=memory_budget_mib)
