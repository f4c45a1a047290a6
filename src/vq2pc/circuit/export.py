"""Export a :class:`MixtureCircuit` to libcirkit and to a plain NumPy archive.

A distilled circuit ``p̂(x) = Σ_n w_n Π_i p(x_i | θ_{n,i})`` is a shallow smooth and
decomposable PC. :func:`to_cirkit` builds exactly that as a libcirkit 0.3.1 symbolic
circuit: ``S`` input layers (variable ``i``; ``N`` units, unit ``n`` = component
``n``'s leaf on ``x_i``) -> one Hadamard layer of arity ``S`` (``N`` units) -> one
sum layer ``N -> 1``. One flat Hadamard layer is enough: compiled with folding,
the ``S`` input layers become one folded layer and ``S = 784`` compiles in under a
second. Parameters (``ConstantTensorInitializer`` values, learnable):

* Gaussian: ``GaussianLayer(mean, stddev)``, both identity-parameterized, so the
  compiled stddev equals ours bit for bit (libcirkit's default stddev is a scaled
  sigmoid in ``[1e-5, 1]``; nothing constrains ours to stay positive if you fine-tune);
* categorical: ``CategoricalLayer(probs = softmax(t))`` with ``t`` = our normalized
  log-probabilities ``[N, L]`` (libcirkit's default parameterization; stays normalized
  when trained). Not ``logits=``: libcirkit 0.3.1's ``TorchCategoricalLayer`` returns its
  logits log-partition as ``[F, K]`` instead of ``[F, 1, K]``, so ``IntegrateQuery``
  (marginals) fails when ``B != F`` and silently mixes folds when ``B == F``. The price:
  libcirkit evaluates ``log(softmax(t))``, which underflows for log-probabilities below
  ``log(finfo.tiny)`` (-87.3 in float32); :func:`compile_cirkit` then raises and asks for
  ``dtype=torch.float64`` (threshold -708.4) instead of changing the density;
* Bernoulli: ``BinomialLayer(total_count=1, logits)`` — libcirkit 0.3.1 has no
  Bernoulli layer, and a Binomial with one trial is exactly one;
* sum weights: ``softmax`` of our normalized log-weights (stays normalized when trained).

Pitfalls of libcirkit 0.3.1 handled here: its default ``lse-sum`` semiring clamps every
log-value at -708.4 (see :mod:`vq2pc.baselines.einet`), so we compile with the project's
``lse-sum-unclamped``; parameters get ``torch.get_default_dtype()`` at compile time
(float64 arrays are silently cast), so we compile under the requested dtype; libcirkit
has no serialization of circuits, so :func:`export_cirkit` saves the compiled
module's ``state_dict`` with a JSON description and :func:`load_cirkit` rebuilds it.

:func:`export_npz` writes ``log_weights [N]`` and the leaf arrays with a JSON header
(``header``), for users of other PC libraries (SPFlow, ProbabilisticCircuits.jl, ...); a class-aware
circuit (:class:`~vq2pc.circuit.classes.ClassMixture`) adds ``class_log_weights [N, C]`` (``log_weights``
is then their class marginal, so a reader that ignores the classes gets ``p̂(x)``). The libcirkit export
of a class-aware circuit is that of its class marginal.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from vq2pc.circuit.cirkit import require_cirkit
from vq2pc.circuit.export_npz import export_npz, exportable, from_npz
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core import validate
from vq2pc.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vq2pc.core.leaves import LEAF_KINDS

__all__ = [
    "cirkit_log_prob",
    "compile_cirkit",
    "export_cirkit",
    "export_npz",
    "from_npz",
    "load_cirkit",
    "to_cirkit",
]

SEMIRING = "lse-sum-unclamped"
CIRKIT_KIND = "cirkit"  # checkpoint tag: vq2pc/cirkit
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _cirkit() -> Any:
    """libcirkit with the unclamped semiring registered, or one clear ``ModuleNotFoundError``."""
    try:
        return require_cirkit()
    except ImportError as exc:
        raise ModuleNotFoundError(
            "exporting to libcirkit needs libcirkit: `pip install libcirkit==0.3.1` (or `pip install vq2pc[baselines]`); "
            "`--format npz` needs nothing extra"
        ) from exc


# --- description and parameter arrays ------------------------------------------------
def _description(circuit: MixtureCircuit, dtype: torch.dtype) -> dict[str, Any]:
    """JSON-able description from which :func:`_symbolic` rebuilds the structure."""
    leaf = circuit.leaf
    return {
        "structure": "S input layers (N units each; unit n = component n) -> Hadamard(arity S) -> Sum(N -> 1)",
        "kind": leaf.kind,
        "num_components": len(circuit),
        "num_variables": circuit.num_variables,
        "num_levels": int(leaf.logits.shape[-1]) if leaf.kind == "categorical" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "semiring": SEMIRING,
        "fold": True,
        "optimize": False,
        "libcirkit": _libcirkit_version(),
        "meta": circuit.meta,
    }


def _libcirkit_version() -> str | None:
    try:
        return importlib.metadata.version("libcirkit")
    except importlib.metadata.PackageNotFoundError:
        return None


def _arrays(circuit: MixtureCircuit) -> dict[str, np.ndarray]:
    """Per-variable parameter arrays: leaf tensors with ``S`` first (``[S, N]`` / ``[S, N, L]``), log_weights ``[N]``."""
    out = {k: np.ascontiguousarray(v.detach().cpu().numpy().swapaxes(0, 1)) for k, v in circuit.leaf.tensors().items()}
    out["log_weights"] = circuit.log_weights.detach().cpu().numpy()
    return out


def _placeholder_arrays(desc: dict[str, Any]) -> dict[str, np.ndarray]:
    """Arrays of the right shapes (values are overwritten by a ``state_dict``)."""
    n, s, dtype = int(desc["num_components"]), int(desc["num_variables"]), np.dtype(desc["dtype"])
    if desc["kind"] == "gaussian":
        out = {"mean": np.zeros((s, n), dtype), "std": np.ones((s, n), dtype)}
    elif desc["kind"] == "categorical":
        out = {"logits": np.zeros((s, n, int(desc["num_levels"])), dtype)}
    else:
        out = {"logits": np.zeros((s, n), dtype)}
    out["log_weights"] = np.zeros(n, dtype)
    return out


# --- libcirkit ------------------------------------------------------------------------
def _symbolic(kind: str, arrays: dict[str, np.ndarray]) -> Any:
    """The symbolic circuit (see module docstring) with parameters set to ``arrays``."""
    _cirkit()
    from cirkit.symbolic.circuit import Circuit
    from cirkit.symbolic.initializers import ConstantTensorInitializer
    from cirkit.symbolic.layers import (
        BinomialLayer,
        CategoricalLayer,
        GaussianLayer,
        HadamardLayer,
        SumLayer,
    )
    from cirkit.symbolic.parameters import Parameter, SoftmaxParameter, TensorParameter
    from cirkit.utils.scope import Scope

    def tensor(a: np.ndarray) -> TensorParameter:
        return TensorParameter(*a.shape, initializer=ConstantTensorInitializer(a))

    def const(a: np.ndarray) -> Parameter:
        return Parameter.from_input(tensor(a))

    n = arrays["log_weights"].shape[0]
    s = next(a for k, a in arrays.items() if k != "log_weights").shape[0]
    if kind == "gaussian":
        inputs = [
            GaussianLayer(Scope([i]), n, mean=const(arrays["mean"][i]), stddev=const(arrays["std"][i]))
            for i in range(s)
        ]
    elif kind == "categorical":
        levels = arrays["logits"].shape[2]
        inputs = [
            CategoricalLayer(
                Scope([i]),
                n,
                num_categories=levels,
                probs=Parameter.from_unary(SoftmaxParameter((n, levels)), tensor(arrays["logits"][i])),
            )
            for i in range(s)
        ]
    else:
        inputs = [BinomialLayer(Scope([i]), n, total_count=1, logits=const(arrays["logits"][i])) for i in range(s)]
    weight = Parameter.from_unary(SoftmaxParameter((1, n)), tensor(arrays["log_weights"][None]))
    root = SumLayer(n, 1, weight=weight)
    if s == 1:  # a Hadamard layer needs arity >= 2
        return Circuit([*inputs, root], {root: inputs}, [root])
    prod = HadamardLayer(n, arity=s)
    return Circuit([*inputs, prod, root], {prod: inputs, root: [prod]}, [root])


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """libcirkit allocates parameters in ``torch.get_default_dtype()``: set it while compiling."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _compile(symbolic: Any, dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    from cirkit.pipeline import PipelineContext

    with _default_dtype(dtype), PipelineContext(backend="torch", semiring=SEMIRING, fold=True, optimize=False) as ctx:
        compiled = ctx.compile(symbolic)
    return compiled.to(device).eval()


def to_cirkit(circuit: MixtureCircuit) -> Any:
    """The libcirkit symbolic circuit (``cirkit.symbolic.circuit.Circuit``) of ``circuit``.

    Scope: variable ``i`` is column ``i`` of the flattened data ``[B, S]``.
    """
    circuit = exportable(circuit)
    return _symbolic(circuit.leaf.kind, _arrays(circuit))


def compile_cirkit(
    circuit: MixtureCircuit, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """The compiled libcirkit torch circuit (unclamped log semiring) on ``device`` in ``dtype``
    (defaults: the circuit's). ``compiled(x [B, S])`` returns ``[B, 1, 1]`` log p̂(x); see
    :func:`cirkit_log_prob`. ``ValueError`` if categorical log-probabilities would underflow in ``dtype``.
    """
    circuit = exportable(circuit)
    dtype = dtype or circuit.log_weights.dtype
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    _check_underflow(circuit, dtype)
    return _compile(to_cirkit(circuit), dtype, device or circuit.device)


def _check_underflow(circuit: MixtureCircuit, dtype: torch.dtype) -> None:
    """libcirkit evaluates categorical leaves as ``log(softmax(t))``: refuse log-probabilities that would underflow."""
    if circuit.leaf.kind != "categorical":
        return
    logits = circuit.leaf.logits
    low = logits.masked_fill(torch.isinf(logits), 0).min().item()
    floor = math.log(torch.finfo(dtype).tiny)
    if low < floor:
        raise ValueError(
            f"categorical log-probabilities go down to {low:.1f}, below log(tiny) = {floor:.1f} of {dtype}: libcirkit's "
            "probability parameterization would turn them into -inf; export with dtype=torch.float64 (CLI: --dtype float64)"
        )


def _discrete_levels(compiled: nn.Module) -> int | None:
    """Number of levels of a compiled circuit's discrete inputs (``None`` for Gaussian inputs)."""
    from cirkit.backend.torch.layers.input import (
        TorchBinomialLayer,
        TorchCategoricalLayer,
    )

    for layer in compiled.layers:
        if isinstance(layer, TorchCategoricalLayer):
            return int(layer.num_categories)
        if isinstance(layer, TorchBinomialLayer):
            return int(layer.total_count) + 1
    return None


def cirkit_log_prob(compiled: nn.Module, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """``[B]`` log p(x) from a compiled circuit, for ``x [B, S]`` or ``[B, C, H, W]``.

    With ``mask`` (bool, same shape as ``x`` or ``[S]``; True = observed), the exact log
    marginal of the observed entries by libcirkit's ``IntegrateQuery``.
    """
    _cirkit()
    from cirkit.backend.torch.queries import IntegrateQuery

    s = int(compiled.num_variables)
    param = next(compiled.parameters())
    x = validate.rows(x, s).to(param.device, param.dtype)
    seen, name = x, "x"
    if mask is not None:
        mask = validate.observed_mask(mask, x.shape[0], s).to(x.device)
        x = torch.where(mask, x, torch.zeros_like(x))
        seen, name = x[mask], "x (observed entries)"
    levels = _discrete_levels(compiled)
    if levels is None:
        validate.check_finite(name, seen)
    else:
        validate.check_levels(seen, levels, name)
    if mask is None:
        return compiled(x)[:, 0, 0]
    return IntegrateQuery(compiled)(x, integrate_vars=~mask)[:, 0, 0]


# --- files ----------------------------------------------------------------------------
def export_cirkit(circuit: MixtureCircuit, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Save the compiled libcirkit circuit: ``{"description": JSON, "state_dict"}`` (a ``vq2pc/cirkit`` checkpoint).

    libcirkit 0.3.1 cannot serialize circuits; :func:`load_cirkit` rebuilds the structure
    from the description and loads the ``state_dict`` (loaded with ``weights_only=True``).
    ``dtype``: of the compiled circuit (default: the circuit's; see :func:`compile_cirkit`).
    """
    circuit = exportable(circuit)
    compiled = compile_cirkit(circuit, "cpu", dtype)
    desc = _description(circuit, next(compiled.parameters()).dtype)
    payload = {"description": json.dumps(desc), "state_dict": compiled.state_dict()}
    return save_checkpoint(path, CIRKIT_KIND, payload)


def load_cirkit(path: str | Path, device: str | torch.device | None = None) -> nn.Module:
    """The compiled libcirkit circuit saved by :func:`export_cirkit` (``CheckpointError`` for bad files)."""
    _cirkit()
    data = load_checkpoint(path, CIRKIT_KIND)
    try:
        desc = json.loads(data["description"])
        if desc["kind"] not in LEAF_KINDS or desc["dtype"] not in _DTYPES:
            raise ValueError(f"unknown kind {desc['kind']!r} or dtype {desc['dtype']!r}")
        compiled = _compile(_symbolic(desc["kind"], _placeholder_arrays(desc)), _DTYPES[desc["dtype"]], "cpu")
        compiled.load_state_dict(data["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a valid exported libcirkit circuit: {exc}") from None
    return compiled.to(device or "cpu")
