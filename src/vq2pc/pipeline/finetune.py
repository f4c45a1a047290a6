"""Pipeline stage: fine-tuned distillation rows ("DMRS+FT", "DMBS+FT", ...), beside the paper-faithful ones.

For every distilled row whose strategy is in the model's ``ft_strategies``, the same selection
(same seed) is fine-tuned on the training split (:func:`vq2pc.circuit.finetune.finetune_distill`),
saved as ``<key>-ft.safetensors`` and evaluated on the test set like every other circuit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vq2pc.circuit.finetune import CAP_MARK, cap_text, finetune_distill
from vq2pc.data.datasets import DataSplits
from vq2pc.evaluate.density import test_bpd
from vq2pc.pipeline.config import RunConfig
from vq2pc.pipeline.models import (
    SourceModel,
    circuit_meta,
    circuit_row,
    distill_params,
    make_selection,
    selection_weights,
)
from vq2pc.pipeline.rundir import Models, RunDir, settings_key

__all__ = ["finetune_all", "ft_row", "ft_sources"]


def _settings(cfg: RunConfig, src: SourceModel) -> Any:
    return dataclasses.replace(src.spec.finetune, seed=cfg.seed, device=cfg.device)


def ft_row(run: RunDir, cfg: RunConfig, splits: DataSplits, src: SourceModel, row: dict[str, Any],
           circuits: Models) -> dict[str, Any]:
    """The fine-tuned twin of the distilled ``row``: computed (or reused), its circuit file added to ``circuits``."""
    settings = _settings(cfg, src)
    if "ft_std_max" in row:
        settings = dataclasses.replace(settings, std_max=row["ft_std_max"])
    settings = settings.for_N(row["N"])  # the refresh interval this N runs with (its cache key)
    capped = cap_text(settings.std_max)
    key = f"{row['selection']}-N{row['requested_N']}-ft" + (capped and f"-cap{capped}")
    path = run.path(src.leaf, src.spec.name, "circuits", f"{key}.safetensors")
    test_x = splits.test_x[: cfg.test_limit] if cfg.test_limit else splits.test_x

    def compute() -> dict[str, Any]:
        selection = make_selection(src, cfg, row["selection"], row["requested_N"])
        circuit, res = finetune_distill(src.vqvae, selection, splits, settings,
                                        weights=selection_weights(src, row["selection"]), meta=circuit_meta(src))
        circuit.meta.update({"image_shape": list(splits.image_shape), "levels": splits.levels})
        circuit.save(path)
        bpd = test_bpd(circuit, test_x, src.leaf, splits.levels, draws=cfg.experiments.bpd_draws,
                       discrete=cfg.experiments.bpd_discrete, generator=torch.Generator().manual_seed(cfg.seed))
        extra = {k: v for k, v in row.items() if k not in ("name", "family", "N", "num_params", "circuit_file",
                                                            "ft_std_max") and not k.startswith("test_bpd")}
        label = "+FT" + (capped and CAP_MARK + capped)
        return circuit_row(row["name"] + label, row["family"] + label, circuit, bpd, **extra,
                           finetune=circuit.meta["finetune"], ft_history=res.history,
                           circuit_file=str(path.relative_to(run.root)))

    params = {**distill_params(cfg, src.spec, strategy=row["selection"]),
              "finetune": settings_key(settings, drop=("progress",), added_later=("clip", "std_max", "refresh_N", "discretized"))}
    out = run.cached("distill", f"{src.leaf}/{src.spec.name}/{key}", compute, outputs=(path,), depends=src.files,
                     params=params)
    circuits.add_file(key, path, out["N"])
    return out


def ft_sources(src: SourceModel, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``src`` to fine-tune: those whose selection is in ``ft_strategies`` (not exhaustive/EM rows)
    at its ``ft_N`` (every N of a selection ``ft_N`` does not name), then, for Gaussian leaves, those at
    ``ft_std_max_N`` of the ``ft_std_max_strategies`` again per cap of ``ft_std_max`` (marked ``"ft_std_max"``)."""
    spec = src.spec
    base = [r for r in rows if r.get("selection") in spec.ft_strategies and r.get("requested_N")
            and r["family"] in ("DMRS", "DMGS", "DMBS", "TopK", "DMData")
            and (r["selection"] not in spec.ft_N or r["requested_N"] in spec.ft_N[r["selection"]])]
    caps = spec.ft_std_max if src.leaf == "gaussian" else []
    capped = [r for r in base if (spec.ft_std_max_N is None or r["requested_N"] in spec.ft_std_max_N)
              and (spec.ft_std_max_strategies is None or r["selection"] in spec.ft_std_max_strategies)]
    return base + [{**r, "ft_std_max": cap} for cap in caps for r in capped]


def finetune_all(run: RunDir, cfg: RunConfig, splits: DataSplits, src: SourceModel, rows: list[dict[str, Any]],
                 circuits: Models) -> list[dict[str, Any]]:
    """+FT rows for the :func:`ft_sources` of ``rows`` (computed, or read from the cache)."""
    return [ft_row(run, cfg, splits, src, r, circuits) for r in ft_sources(src, rows)]
