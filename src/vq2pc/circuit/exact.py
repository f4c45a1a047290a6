"""``ExactModel``: the exact model ExM ``p(x) = Σ_z p(z) p(x | z)`` over ALL ``K^{HW}`` latents.

The exact model is the exhaustive distilled circuit with prior weights, but it is
never materialized: MNIST with a 2×2 grid and ``K = 32`` has ``2^20`` components
(6.6 GB of Gaussian leaf parameters), ``K = 96`` has 85M. Instead ``log p(z)`` is
enumerated once (``[K^{HW}]`` float32, :func:`vq2pc.latents.enumerate.enumerate_log_prior`)
and every query streams over the latent space in lexicographic chunks: a chunk of
latents is decoded (:func:`vq2pc.circuit.distill.decode_leaf`), wrapped in a chunk
:class:`~vq2pc.circuit.MixtureCircuit` whose ``log_likelihoods`` (the fast kernel)
gives ``[B, n_chunk]``, ``log p(z)`` of the chunk is added, and the result is folded
into running reductions (float64 log-sum-exp, rescaled weighted sums, running
Gumbel argmax, running top-k). Memory is bounded by the chunk size, whatever
``K^{HW}``; results equal the materialized circuit's up to float round-off.

Data conventions are those of :class:`~vq2pc.circuit.MixtureCircuit`: ``x`` is
``[B, S]`` or ``[B, C, H, W]`` in model space, masks are bool (True = observed).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor
from tqdm.auto import tqdm

from vq2pc.circuit.distill import check_std_floor, decode_leaf
from vq2pc.circuit.io import prepare_input
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.circuit.queries import Block, Sampler, posterior_draw, posterior_mean
from vq2pc.circuit.streaming import Scratch, logsumexp_
from vq2pc.core.distributed import (
    all_reduce_logsumexp,
    is_distributed,
    is_main,
    shard_range,
)
from vq2pc.core.leaves import Leaf
from vq2pc.core.protocols import Decoder, Prior, missing_members
from vq2pc.core.random import gumbel_noise
from vq2pc.latents.enumerate import check_space, enumerate_log_prior, index_to_codes

__all__ = ["ExactModel"]

_MIB = 1 << 20
_COPIES = 3
"""Bytes of one decoded chunk ≈ ``_COPIES`` × its leaf parameters (decoder output, leaf, kernel tables)."""


class ExactModel(Sampler):
    """The exact mixture over every latent, queried by streaming over chunks of latents.

    Args:
        vqvae: a :class:`~vq2pc.core.protocols.Decoder` (e.g. a :class:`~vq2pc.models.vqvae.VQVAE`) giving ``p(x | z)``.
        prior: a :class:`~vq2pc.core.protocols.Prior` with the same ``K`` and latent grid.
        chunk: most latents decoded and scored at once (lowered when one chunk's leaf
            parameters or a query's ``[B, chunk]`` scores would exceed ``memory_budget_mib``).
        max_space: largest ``K^{HW}`` accepted (``ValueError`` above it).
        memory_budget_mib: memory bound of one chunk (and of each chunk circuit's temporaries).
        device: where to compute (both models are moved there, in place); default: the VQ-VAE's device.
        progress: show a tqdm bar per streaming pass.
        std_floor: raise decoded Gaussian stds below it to it (see :func:`vq2pc.circuit.distill.decode_leaf`).
    """

    def __init__(
        self,
        vqvae: Decoder,
        prior: Prior,
        *,
        chunk: int = 8192,
        max_space: int = 2**27,
        memory_budget_mib: float = 1024,
        device: str | torch.device | None = None,
        progress: bool = False,
        std_floor: float | None = None,
    ) -> None:
        for model, protocol in ((vqvae, Decoder), (prior, Prior)):
            if not isinstance(model, protocol):
                raise ValueError(
                    f"{type(model).__name__} is not a {protocol.__name__}: it lacks "
                    f"{missing_members(model, protocol)} (see vq2pc.core.protocols)"
                )
        if prior.K != vqvae.K or tuple(prior.latent_hw) != tuple(vqvae.latent_hw):
            raise ValueError(
                f"prior (K={prior.K}, grid {tuple(prior.latent_hw)}) does not match the VQ-VAE "
                f"(K={vqvae.K}, grid {tuple(vqvae.latent_hw)})"
            )
        if int(chunk) < 1 or not memory_budget_mib > 0:
            raise ValueError(f"chunk must be >= 1 and memory_budget_mib > 0, got {chunk}, {memory_budget_mib}")
        self.K, self.latent_hw = int(vqvae.K), tuple(vqvae.latent_hw)
        self._space = check_space(self.K, *self.latent_hw, max_space)
        self.device = torch.device(device) if device is not None else next(vqvae.parameters()).device
        self.vqvae, self.prior = vqvae.to(self.device).eval(), prior.to(self.device).eval()
        self.memory_budget_mib, self.progress = float(memory_budget_mib), bool(progress)
        self._template = decode_leaf(vqvae, torch.zeros((1, *self.latent_hw), dtype=torch.long, device=self.device))
        check_std_floor(std_floor, self._template.kind)
        self.std_floor = std_floor
        self.log_prior = enumerate_log_prior(prior, device=self.device, progress=progress, max_space=max_space)
        per_component = sum(t[0].numel() * t.element_size() for t in self._template.tensors().values())
        self._rows = max(1, int(self.memory_budget_mib * _MIB // (_COPIES * per_component)))  # decoded rows that fit
        self.chunk = min(int(chunk), self._rows)

    # --- structure ------------------------------------------------------------------
    def __len__(self) -> int:
        """``K^{HW}``, the number of components."""
        return self._space

    @property
    def num_variables(self) -> int:
        """``S``."""
        return self._template.num_variables

    @property
    def leaf_kind(self) -> str:
        """``gaussian``, ``categorical`` or ``bernoulli``."""
        return self._template.kind

    @property
    def num_params(self) -> int:
        """Parameters of the equivalent materialized circuit: ``K^{HW}`` × (leaf parameters per
        component) + ``K^{HW}`` weights (what :attr:`MixtureCircuit.num_params` would report)."""
        per_component = sum(t[0].numel() for t in self._template.tensors().values())
        return len(self) * (per_component + 1)

    def __repr__(self) -> str:
        return f"ExactModel(kind={self.leaf_kind}, N={len(self)}, S={self.num_variables}, chunk={self.chunk})"

    # --- streaming ------------------------------------------------------------------
    def _prepare(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Validated ``x [B, S]`` (unobserved entries filled with a valid value) and ``mask [B, S]`` or None."""
        return prepare_input(x, mask, self._template, self._template.mode()[0])

    def _decode(self, idx: Tensor) -> Leaf:
        """Leaf ``[n, S]`` of the latents with lexicographic indices ``idx [n]``."""
        return decode_leaf(self.vqvae, index_to_codes(idx, self.K, *self.latent_hw), std_floor=self.std_floor)

    def _chunks(
        self, batch: int, desc: str, span: tuple[int, int] | None = None
    ) -> Iterator[tuple[int, MixtureCircuit]]:
        """Yield ``(n0, circuit)`` for consecutive chunks ``n0:n0+len(circuit)`` of the latent space
        (of its slice ``span = (lo, hi)`` when given) scored ``batch`` rows at a time; the circuit's
        log-weights are ``log p(z)`` of the chunk (renormalized inside the circuit)."""
        lo, hi = span or (0, len(self))
        step = max(1, min(self.chunk, int(self.memory_budget_mib * _MIB // (16 * batch))))
        quiet = not (self.progress and is_main())  # under torchrun: one bar, rank 0's
        with tqdm(total=hi - lo, desc=desc, unit="z", disable=quiet, leave=False) as bar:
            for n0 in range(lo, hi, step):
                n1 = min(n0 + step, hi)
                leaf = self._decode(torch.arange(n0, n1, device=self.device))
                yield (
                    n0,
                    MixtureCircuit(
                        leaf, self.log_prior[n0:n1], memory_budget_mib=self.memory_budget_mib, _trusted=True
                    ),
                )  # decoded here: the input checks ran once, in _prepare
                bar.update(n1 - n0)

    def chunks(self, batch: int, desc: str = "ExM") -> Iterator[tuple[int, MixtureCircuit]]:
        """``(n0, chunk circuit)`` over the whole latent space, scored ``batch`` rows at a time (for queries
        built on this model, e.g. :class:`~vq2pc.circuit.classes.ClassMixture`); see :meth:`_chunks`."""
        return self._chunks(batch, desc)

    def _scores(self, circuit: MixtureCircuit, n0: int, x: Tensor, mask: Tensor | None) -> Tensor:
        """``[B, n]`` log p(z) + log p(x_o | z) for the chunk's latents (float32)."""
        return circuit.log_likelihoods_prepared(x, mask) + self.log_prior[n0 : n0 + len(circuit)]

    def _score_blocks(self, x: Tensor, mask: Tensor | None, desc: str) -> Iterator[Block]:
        """The latent space's chunks as :mod:`~vq2pc.circuit.queries` reads them (one streaming pass)."""
        for n0, circuit in self._chunks(x.shape[0], desc):
            yield n0, self._scores(circuit, n0, x, mask), circuit.component_means

    # --- likelihoods ----------------------------------------------------------------
    scores_whole_sets = True
    """:meth:`log_prob` takes a whole test set at once (``evaluate.density`` relies on it)."""

    @torch.no_grad()
    def log_prob(
        self, x: Tensor, mask: Tensor | None = None, batch_size: int = 500, sharded: bool | None = None
    ) -> Tensor:
        """``[B]`` exact log p(x), or log p(x_o) of the observed entries when ``mask`` is given.

        Any ``B``: latent chunks outside, rows inside (``batch_size`` at a time, a running float64
        log-sum-exp per row), so each latent is decoded once per call, whatever ``B``.
        ``sharded`` (default: when a process group runs; every rank must call it then): each rank
        streams its :func:`~vq2pc.core.distributed.shard_range` of ``K^{HW}`` and an exact
        log-sum-exp all-reduce combines the ranks; every rank gets the result.
        """
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        x, mask = self._prepare(x, mask)
        sharded = is_distributed() if sharded is None else sharded
        acc = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=self.device)
        rows = [slice(a, a + int(batch_size)) for a in range(0, x.shape[0], int(batch_size))]
        span = shard_range(len(self)) if sharded else None
        for n0, circuit in self._chunks(min(int(batch_size), max(1, x.shape[0])), "ExM log p(x)", span):
            for r in rows:
                scores = self._scores(circuit, n0, x[r], None if mask is None else mask[r])
                acc[r] = torch.logaddexp(acc[r], logsumexp_(scores).double())
        return (all_reduce_logsumexp(acc) if sharded else acc).float()

    @torch.no_grad()
    def posterior_top(self, x: Tensor, mask: Tensor | None = None, k: int = 10) -> tuple[Tensor, Tensor]:
        """The ``k`` most probable latents a posteriori: ``(log p(z | x_o) [B, k], index [B, k])``,
        descending; indices are lexicographic (``enumerate.index_to_codes`` gives the grids)."""
        if not 1 <= int(k) <= len(self):
            raise ValueError(f"k must lie in [1, K^(HW) = {len(self)}], got {k}")
        x, mask = self._prepare(x, mask)
        acc = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=self.device)
        top_val, top_idx = None, None
        for n0, circuit in self._chunks(x.shape[0], "ExM posterior"):
            s = self._scores(circuit, n0, x, mask)
            acc = torch.logaddexp(acc, torch.logsumexp(s, 1).double())
            idx = torch.arange(n0, n0 + s.shape[1], device=self.device).expand_as(s)
            if top_val is not None:
                s, idx = torch.cat([top_val, s], 1), torch.cat([top_idx, idx], 1)
            top_val, pos = s.topk(min(int(k), s.shape[1]), 1)
            top_idx = idx.gather(1, pos)
        return (top_val.double() - acc[:, None]).float(), top_idx

    # --- conditionals -----------------------------------------------------------------
    @torch.no_grad()
    def conditional_mean(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B, S]`` exact E[x | x_o] = Σ_z p(z | x_o) E[x | z]; observed entries are copied through
        (``mask=None``: everything is observed, so this is ``x`` itself).

        One streaming pass: running maximum of the scores, sums rescaled when it grows (float64)."""
        x, mask = self._prepare(x, mask)
        if mask is None:
            return x.clone()
        cm = posterior_mean(self._score_blocks(x, mask, "ExM E[x|x_o]"), torch.float64).float()
        return cm if mask is None else torch.where(mask, x, cm)

    def _posterior_draw(self, x: Tensor, mask: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """``[B]`` index of one latent per row drawn from p(z | x_o) (streaming Gumbel-max)."""
        return posterior_draw(self._score_blocks(x, mask, "ExM posterior draw"), generator, Scratch())

    def _sample_leaves(self, idx: Tensor, generator: torch.Generator | None) -> Tensor:
        """``[n, S]``: one draw from p(x | z) for each latent index ``idx [n]`` (decoded in memory-bounded blocks)."""
        return torch.cat(
            [self._decode(idx[a : a + self._rows]).sample(generator) for a in range(0, len(idx), self._rows)]
        )

    @torch.no_grad()
    def _draw(self, n: int, generator: torch.Generator | None) -> Tensor:
        """``[n, S]`` ancestral: ``c ~ p(c)``, ``z ~ p(z | c)`` (:meth:`~vq2pc.core.protocols.Prior.sample`),
        ``x ~ p(x | z)``."""
        log_pc = self.prior.class_log_prior.float()
        c = (log_pc + gumbel_noise((n, log_pc.shape[0]), generator, self.device)).argmax(1)
        parts = []
        for a in range(0, n, self._rows):
            z = self.prior.sample(c[a : a + self._rows], generator)
            parts.append(decode_leaf(self.vqvae, z, std_floor=self.std_floor).sample(generator))
        return torch.cat(parts)

    @torch.no_grad()
    def _draw_given(self, x: Tensor, mask: Tensor | None, generator: torch.Generator | None) -> Tensor:
        """``[B, S]``: ``z`` by a streaming Gumbel-max over the posterior scores, then its leaf (the semantics of
        :meth:`MixtureCircuit.sample`)."""
        return self._sample_leaves(self._posterior_draw(x, mask, generator), generator)
