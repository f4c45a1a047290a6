"""The checks of :meth:`vq2pc.pipeline.config.RunConfig.validate` that need more than a type: ranges, names
that must exist, settings that must agree; each raises one ``ValueError`` naming the setting."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vq2pc.baselines.cm import CM_RECIPES
from vq2pc.models.priors import prior_config

if TYPE_CHECKING:
    from vq2pc.pipeline.config import BaselineSpec, ModelSpec

__all__ = ["check_cm_recipe", "check_extra_N", "check_ft_N", "check_counts", "check_device_name", "check_prior"]


def check_cm_recipe(b: BaselineSpec) -> None:
    """``cm_recipe`` is None, mlp or paper; the paper recipe's settings are counts, given only with it."""
    where = "config.baselines"
    if b.cm_recipe not in (None, *CM_RECIPES):
        raise ValueError(f"{where}: cm_recipe must be one of {list(CM_RECIPES)}, got {b.cm_recipe!r}")
    check_counts(b, ("cm_channels", "cm_refresh", "cm_top_k"), where)
    paper_only = [k for k in ("cm_channels", "cm_refresh", "cm_top_k") if getattr(b, k) is not None]
    if b.cm_recipe != "paper" and paper_only:
        raise ValueError(
            f"{where}: {paper_only} apply to cm_recipe: paper only (cm_recipe is {b.cm_recipe or 'mlp'!r})"
        )
    if b.cm_recipe == "paper" and b.cm_points & (b.cm_points - 1):
        raise ValueError(f"{where}: cm_points is the paper recipe's Sobol grid, a power of 2; got {b.cm_points}")
    if b.cm_recipe == "paper" and b.cm_top_k is not None and b.cm_top_k > b.cm_points:
        raise ValueError(f"{where}: cm_top_k must be <= cm_points ({b.cm_points}), got {b.cm_top_k}")


def check_extra_N(m: ModelSpec) -> None:
    """``extra_N`` maps strategies of the model (not exhaustive) to lists of integers >= 1."""
    where = f"config: model {m.name!r} extra_N"
    if not isinstance(m.extra_N, dict):
        raise ValueError(f"{where} must map strategies to lists of N, e.g. {{sample: [16384]}}; got {m.extra_N!r}")
    for strategy, ns in m.extra_N.items():
        if strategy not in m.strategies or strategy == "exhaustive":
            raise ValueError(
                f"{where} names {strategy!r}, which is not one of the model's strategies "
                f"{[s for s in m.strategies if s != 'exhaustive']}"
            )
        if not isinstance(ns, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in ns):
            raise ValueError(f"{where}[{strategy!r}] must be a list of integers >= 1, got {ns!r}")


def check_ft_N(m: ModelSpec) -> None:
    """``ft_N`` maps ``ft_strategies`` to lists of that strategy's N (``N`` and its ``extra_N``)."""
    where = f"config: model {m.name!r} ft_N"
    if not isinstance(m.ft_N, dict):
        raise ValueError(f"{where} must map ft_strategies to lists of N, e.g. {{beam: [4096]}}; got {m.ft_N!r}")
    for strategy, ns in m.ft_N.items():
        if strategy not in m.ft_strategies:
            raise ValueError(f"{where} names {strategy!r}, which is not one of ft_strategies {m.ft_strategies}")
        have = [*m.N, *m.extra_N.get(strategy, [])]
        if not isinstance(ns, list) or not ns or not set(ns) <= set(have):
            raise ValueError(f"{where}[{strategy!r}] must be a non-empty list of {strategy}'s N {have}, got {ns!r}")


def check_counts(obj: Any, names: tuple[str, ...], where: str, low: int = 1) -> None:
    """Each attribute in ``names`` of ``obj`` is None or an integer >= ``low``."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{where}: {name} must be an integer >= {low}, got {value!r}")


def check_device_name(name: Any) -> None:
    """A device string torch can parse (whether this machine has it is checked when the run starts)."""
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"config: device {name!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None


def check_prior(m: ModelSpec) -> None:
    """A clear error for an unknown prior (one of ``PRIOR_NAMES``) or sizes that do not make one."""
    try:
        prior_config(m.prior, m.K, tuple(m.latent_hw), 1, m.prior_hidden, m.prior_layers, m.prior_heads)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"config: model {m.name!r}: {exc}") from None
