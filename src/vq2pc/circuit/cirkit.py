"""The bridge to libcirkit (optional dependency): import check, an unclamped log-sum-exp semiring and a
folded-circuit evaluator whose cost is linear in the circuit's size.

libcirkit's ``lse-sum`` semiring clamps every sum and product layer from below at
-708.3964 (log of the smallest normal float64), which makes an image's log-density
a constant and stops learning; ``lse-sum-unclamped`` is the same algebra without
the clamp (why: :mod:`vq2pc.baselines.einet`). Used by the export of circuits and
by the EiNet baseline.

:class:`FoldedEvaluator`: libcirkit 0.3.1 evaluates a folded layer by concatenating the *whole* outputs of
every layer it reads from and indexing the folds it needs (``LayerAddressBook.lookup``). A layer that reads a
few folds of the input layer (``[S, B, K]``, all pixels) copies all of it, and the backward pass of that index
allocates and fills a zero tensor of its size; in a deep circuit (a Chow–Liu tree has ~130 folded layers on
MNIST) that is 70% of a training step. The evaluator gathers each layer's output once, for all of its readers
in one index, and splits it into one piece per reader, so forward and backward touch each output a constant
number of times. Same values and gradients as ``circuit.evaluate`` (tested).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["require_cirkit", "UNCLAMPED_SEMIRING", "FoldedEvaluator"]

UNCLAMPED_SEMIRING = "lse-sum-unclamped"


def require_cirkit() -> Any:
    """Import libcirkit (with our unclamped semiring registered) or explain how to install it."""
    try:
        import cirkit  # noqa: F401
        from cirkit.backend.torch.semiring import (
            LSESumSemiring,
            SemiringImpl,
            SumProductSemiring,
        )
    except ImportError as exc:
        raise ModuleNotFoundError(
            "the EiNet baseline needs libcirkit: `pip install libcirkit==0.3.1` (or `pip install vq2pc[baselines]`)"
        ) from exc
    if UNCLAMPED_SEMIRING not in set(SemiringImpl.list()):
        _register_semiring(SemiringImpl, LSESumSemiring, SumProductSemiring)
    return cirkit


def _register_semiring(base: Any, lse: Any, sp: Any) -> None:
    """Register ``lse-sum-unclamped``: libcirkit's log-sum-exp semiring without its -708.4 floor."""

    class UnclampedLSESum(lse):  # type: ignore[misc, valid-type]
        @classmethod
        def sum(cls, x: Tensor, dim: int, *, keepdim: bool = False) -> Tensor:
            return x.logsumexp(dim=dim, keepdim=keepdim)

        @classmethod
        def add(cls, *xs: Tensor) -> Tensor:
            return functools.reduce(torch.logaddexp, xs)

        @classmethod
        def prod(cls, x: Tensor, dim: int, *, keepdim: bool = False) -> Tensor:
            return x.sum(dim=dim, keepdim=keepdim)

        @classmethod
        def mul(cls, *xs: Tensor) -> Tensor:
            return functools.reduce(torch.add, xs)

        @classmethod
        def apply_reduce(cls, func: Any, *xs: Tensor, dim: int, keepdim: bool) -> Tensor:
            tops = [torch.amax(x, dim=dim, keepdim=True).clamp(min=torch.finfo(x.dtype).min) for x in xs]
            out = func(*[torch.exp(x - t) for x, t in zip(xs, tops)])
            shift = functools.reduce(torch.add, tops)
            return torch.log(out) + (shift if keepdim else shift.squeeze(dim))

    base.register(UNCLAMPED_SEMIRING)(UnclampedLSESum)
    UnclampedLSESum.register_map_from(lse)(lambda x: x)
    lse.register_map_from(UnclampedLSESum)(lambda x: x)
    UnclampedLSESum.register_map_from(sp)(torch.log)
    sp.register_map_from(UnclampedLSESum)(torch.exp)


def _local_folds(idx: Tensor, ids: list[int], folds: list[int], whole: list[bool]) -> tuple[list[Tensor], Tensor]:
    """Split a fold index into the concatenation of layers ``ids`` (fold counts ``folds``): the sorted
    folds each layer must give (``[F_j]`` each; all of them where ``whole``, a layer with no other reader,
    which then needs no gather), and the index into the concatenation of those pieces."""
    offsets = torch.tensor([0, *folds]).cumsum(0)
    owner = torch.bucketize(idx, offsets[1:], right=True)  # which layer each entry reads
    local, remapped, base = [], torch.empty_like(idx), 0
    for j in range(len(ids)):
        mine = owner == j
        wanted = torch.arange(folds[j]) if whole[j] else torch.unique(idx[mine] - offsets[j])  # sorted
        remapped[mine] = base + torch.searchsorted(wanted, idx[mine] - offsets[j])
        local.append(wanted)
        base += len(wanted)
    return local, remapped


class FoldedEvaluator(nn.Module):
    """Evaluates a folded libcirkit circuit with each layer's output gathered once for all its readers.

    Built from the circuit's address book (one entry per folded layer, in topological order; the last
    gives the outputs). The index tensors are non-persistent buffers: they follow ``.to(device)`` and stay
    out of checkpoints. ``evaluator(x, module_fn)`` equals ``circuit.evaluate(x, module_fn=module_fn)``.
    """

    def __init__(self, circuit: nn.Module) -> None:
        super().__init__()
        entries = list(circuit._address_book)  # libcirkit 0.3.1 internals, pinned
        self._layers = [e.module for e in entries]  # a plain list: the circuit owns them
        folds = [0 if m is None else int(m.num_folds) for m in self._layers]
        readers = Counter(m for e in entries if e.in_module_ids for m in e.in_module_ids[0])
        demands: list[list[tuple[int, Tensor]]] = [[] for _ in entries]  # per layer: (reader, its folds)
        self._reads: list[tuple[list[int], Any] | None] = []
        for i, e in enumerate(entries):
            if not e.in_module_ids:
                self._reads.append(None)
                continue
            (ids,), (idx,) = e.in_module_ids, e.in_fold_idx
            if isinstance(idx, Tensor):
                local, idx = _local_folds(idx, ids, [folds[m] for m in ids], [readers[m] == 1 for m in ids])
                self.register_buffer(f"_read_{i}", idx, persistent=False)
                idx = f"_read_{i}"
            else:  # a view of the whole outputs in order (libcirkit's unsqueeze shortcut)
                local = [torch.arange(folds[m]) for m in ids]
            for m, wanted in zip(ids, local):
                demands[m].append((i, wanted))
            self._reads.append((list(ids), idx))
        self._splits: list[tuple[list[int], list[int]]] = []  # per layer: readers, piece sizes
        for m, dem in enumerate(demands):
            gather = torch.cat([w for _, w in dem]) if dem else torch.empty(0, dtype=torch.long)
            if not (len(dem) == 1 and torch.equal(gather, torch.arange(folds[m]))):
                self.register_buffer(f"_gather_{m}", gather, persistent=False)
            self._splits.append(([r for r, _ in dem], [len(w) for _, w in dem]))

    def forward(self, x: Tensor, module_fn: Callable[..., Tensor] | None = None) -> Tensor:
        """``x [B, D]`` -> the circuit's output ``[O, B, K]``."""
        pieces: dict[tuple[int, int], Tensor] = {}
        for i, (layer, read) in enumerate(zip(self._layers, self._reads)):
            if read is None:  # an input layer reads the batch: x (B, D) -> (F, B, D')
                inputs: tuple = (x[..., layer.scope_idx].permute(1, 0, 2),) if layer.num_variables else (len(x),)
            else:
                ids, idx = read
                parts = [pieces.pop((m, i)) for m in ids]
                z = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
                z = z[getattr(self, idx) if isinstance(idx, str) else idx]
                if layer is None:
                    return z
                inputs = (z,)
            y = layer(*inputs) if module_fn is None else module_fn(layer, *inputs)
            readers, sizes = self._splits[i]
            gather = getattr(self, f"_gather_{i}", None)
            y = y if gather is None else y[gather]
            pieces.update(zip(((i, r) for r in readers), y.split(sizes) if len(sizes) > 1 else (y,)))
        raise RuntimeError("the circuit's address book has no output entry")
