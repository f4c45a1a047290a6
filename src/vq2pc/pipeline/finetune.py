"""Pipeline stage: fine-tuned distillation rows ("DMRS+FT", "DMBS+FT", ...), beside the paper-faithful ones.

For every distilled row whose strategy is in the model's ``ft_strategies``, the same selection
(same seed) is fine-tuned on the training split (:func:`vq2pc.circuit.finetune.finetune_distill`),
saved as ``<key>-ft.safetensors`` and evaluated on the test set like every other circuit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from vq2pc.circuit.finetune import CAP_MARK, cap_text, finetune_distill
from vq2pc.data.datasets import DataSplits
from vq2pc.pipeline.config import RunConfig
from vq2pc.pipeline.models import (
    SourceModel,
    circuit_meta,
    distill_params,
    make_selection,
    refined_row,
    score_test,
    selection_weights,
)
from vq2pc.pipeline.rows import ResultRow
from vq2pc.pipeline.rundir import Models, RunDir, settings_key

__all__ = ["FTJob", "finetune_all", "ft_row", "ft_sources"]


class FTJob(NamedTuple):
    """A +FT row to make: the distilled ``row`` it fine-tunes, and a cap of ``ft_std_max`` (None: the settings')."""

    row: ResultRow
    std_max: float | None = None


def _settings(cfg: RunConfig, src: SourceModel) -> Any:
    return dataclasses.replace(src.spec.finetune, seed=cfg.seed, device=cfg.device)


def ft_row(
    run: RunDir, cfg: RunConfig, splits: DataSplits, src: SourceModel, job: FTJob, circuits: Models
) -> ResultRow:
    """The fine-tuned twin of the distilled ``job.row``: computed (or reused), its circuit file added to ``circuits``."""
    row, settings = job.row, _settings(cfg, src)
    if job.std_max is not None:
        settings = dataclasses.replace(settings, std_max=job.std_max)
    settings = settings.for_N(row.N)  # the refresh interval this N runs with (its cache key)
    capped = cap_text(settings.std_max)
    key = f"{row.selection}-N{row.requested_N}-ft" + (capped and f"-cap{capped}")
    path = run.path(src.leaf, src.spec.name, "circuits", f"{key}.safetensors")
    test_x = splits.test_x[: cfg.test_limit] if cfg.test_limit else splits.test_x

    def compute() -> dict[str, Any]:
        selection = make_selection(src, cfg, row.selection, row.requested_N)
        # an interrupted fine-tuning resumes from here (training restarts if the source or the settings changed)
        ckpt = run.checkpoint(
            "distill", src.leaf, src.spec.name, "circuits", f"{key}.pt", after=src.files, params=params
        )
        circuit, res = finetune_distill(
            src.vqvae,
            selection,
            splits,
            settings,
            checkpoint=ckpt,
            weights=selection_weights(src, row.selection),
            meta=circuit_meta(src),
        )
        circuit.meta.update({"image_shape": list(splits.image_shape), "levels": splits.levels})
        circuit.save(path)
        run.discard(ckpt)
        bpd = score_test(cfg, circuit, test_x, src.leaf, splits.levels)
        return refined_row(
            row,
            "+FT" + (capped and CAP_MARK + capped),
            circuit,
            bpd,
            finetune=circuit.meta["finetune"],
            ft_history=res.history,
            circuit_file=str(path.relative_to(run.root)),
        ).to_dict()

    params = {
        **distill_params(cfg, src.spec, strategy=row.selection),
        "finetune": settings_key(settings, drop=("progress",)),
    }
    out = ResultRow.from_dict(
        run.cached(
            "distill", f"{src.leaf}/{src.spec.name}/{key}", compute, outputs=(path,), depends=src.files, params=params
        )
    )
    circuits.add_file(key, path, out.N)
    return out


def ft_sources(src: SourceModel, rows: list[ResultRow]) -> list[FTJob]:
    """The rows of ``src`` to fine-tune: those whose selection is in ``ft_strategies`` (not exhaustive/EM rows)
    at its ``ft_N`` (every N of a selection ``ft_N`` does not name), then, for Gaussian leaves, those at
    ``ft_std_max_N`` of the ``ft_std_max_strategies`` again per cap of ``ft_std_max``."""
    spec = src.spec
    base = [
        r
        for r in rows
        if r.selection in spec.ft_strategies
        and r.requested_N
        and r.family in ("DMRS", "DMGS", "DMBS", "TopK", "DMData")
        and (r.selection not in spec.ft_N or r.requested_N in spec.ft_N[r.selection])
    ]
    caps = spec.ft_std_max if src.leaf == "gaussian" else []
    capped = [
        r
        for r in base
        if (spec.ft_std_max_N is None or r.requested_N in spec.ft_std_max_N)
        and (spec.ft_std_max_strategies is None or r.selection in spec.ft_std_max_strategies)
    ]
    return [FTJob(r) for r in base] + [FTJob(r, cap) for cap in caps for r in capped]


def finetune_all(
    run: RunDir, cfg: RunConfig, splits: DataSplits, src: SourceModel, rows: list[ResultRow], circuits: Models
) -> list[ResultRow]:
    """+FT rows for the :func:`ft_sources` of ``rows`` (computed, or read from the cache)."""
    return [ft_row(run, cfg, splits, src, job, circuits) for job in ft_sources(src, rows)]
