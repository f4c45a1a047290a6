"""The orchestration of a run: data → VQ-VAE → prior → circuits → +FT → baselines → experiments → report.

:func:`run_pipeline` runs every stage of a :class:`~vq2pc.pipeline.config.RunConfig` into a run directory
(:mod:`~vq2pc.pipeline.rundir`); each stage lives in its own module (models, finetune, baselines,
experiments), and this one only calls them in order, checks the folder's data stamp and writes the report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml

from vq2pc.core.distributed import is_distributed, is_main
from vq2pc.core.files import atomic_write, write_json
from vq2pc.data.datasets import load_dataset
from vq2pc.pipeline.baselines import run_baselines
from vq2pc.pipeline.config import RunConfig, config_to_dict
from vq2pc.pipeline.distill import distill_all
from vq2pc.pipeline.experiments import run_experiments
from vq2pc.pipeline.findings import findings
from vq2pc.pipeline.finetune import finetune_all, ft_row, ft_sources
from vq2pc.pipeline.helper import HelperProcess
from vq2pc.pipeline.models import SourceModel, build_source_model
from vq2pc.pipeline.rows import ResultRow
from vq2pc.pipeline.rundir import CACHE_SCHEMA, Models, RunDir, check_schema, check_stages

__all__ = ["run_pipeline"]


class _Log:
    """Progress lines with the seconds since the run started."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if is_main():  # under torchrun: rank 0 speaks for all
            print(f"[vq2pc {time.perf_counter() - self.start:5.0f}s] {msg}", flush=True)


def run_pipeline(cfg: RunConfig, out: str | Path, force: Iterable[str] = (), jobs: int = 1) -> dict[str, Any]:
    """Run every stage of ``cfg`` into ``out``; returns the report (also written as report.json/report.md).

    ``jobs=2`` trains the baselines in a second process (:class:`HelperProcess`, half of the torch
    threads) beside the VQ-VAE, prior and circuit stages; it then shares the +FT rows. A stage's numbers
    depend on its thread count at float-noise level (amplified by chaotic steps such as k-means
    initialisation), so they can differ from a ``jobs=1`` run's; the same ``jobs`` on the same machine gives
    the same numbers."""
    if jobs not in (1, 2) or (jobs == 2 and is_distributed()):
        raise ValueError(f"jobs must be 1 or 2 (2 not under torchrun, whose ranks already share the work), got {jobs}")
    log = _Log()
    start = log.start
    check_stages(force)
    torch.manual_seed(cfg.seed)
    splits = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, limit=cfg.limit)  # fails before a folder exists
    run = RunDir(Path(out), set(force))
    data_record = _check_data(run, cfg, splits, log)
    cfg_dict = config_to_dict(cfg)
    atomic_write(run.path("config.yaml"), lambda p: p.write_text(yaml.safe_dump(cfg_dict, sort_keys=False)))
    log(
        f"{cfg.dataset}: {len(splits.train_x)} train / {len(splits.val_x)} val / {len(splits.test_x)} test images "
        f"of shape {tuple(splits.image_shape)}, L = {splits.levels}"
    )
    report: dict[str, Any] = {
        "dataset": cfg.dataset,
        "description": cfg.description,
        "image_shape": list(splits.image_shape),
        "levels": splits.levels,
        "splits": {s: len(getattr(splits, f"{s}_x")) for s in ("train", "val", "test")},
        "device": cfg.device,
        "seed": cfg.seed,
        "config": cfg_dict,
        "models": [],
        "sources": [],
        "experiments": {},
        "notes": [],
    }
    helper = _start_helper(cfg, run, log) if jobs == 2 else None
    try:
        _run_leaves(cfg, run, splits, report, log, helper)
        if helper is not None:
            helper.close()
    finally:
        if helper is not None:
            helper.stop()
    write_json(run.root / "data.json", data_record)
    report["wall_seconds"] = round(time.perf_counter() - start, 2)
    report["total_wall_seconds"] = round(_previous_total(run) + report["wall_seconds"], 2)
    _finish_report(run, report)
    log(f"done in {report['wall_seconds']:.0f} s: {run.root / 'report.md'}")
    return report


def _start_helper(cfg: RunConfig, run: RunDir, log: _Log) -> HelperProcess:
    helper = HelperProcess(cfg, run)
    log(
        f"baselines, then a share of the +FT rows, in a second process with {helper.share} of {helper.threads} "
        f"threads (log: {helper.log})"
    )
    return helper


def _run_leaves(
    cfg: RunConfig, run: RunDir, splits: Any, report: dict[str, Any], log: _Log, helper: HelperProcess | None
) -> None:
    """Every stage of every leaf: source models, circuits, +FT rows, baselines, experiments."""
    for leaf in cfg.leaves:
        built = {}
        for spec in cfg.models:
            log(f"[{leaf}/{spec.name}] VQ-VAE (K={spec.K}, grid {spec.latent_hw[0]}x{spec.latent_hw[1]}) and prior")
            src = build_source_model(run, cfg, splits, leaf, spec)
            report["sources"].append(
                {"leaf": leaf, "model": spec.name, "K": spec.K, "latent_hw": list(spec.latent_hw), **src.info}
            )
            log(f"[{leaf}/{spec.name}] distilling {', '.join(spec.strategies)}")
            rows, circuits = distill_all(run, cfg, splits, src, report["notes"])
            if spec.ft_strategies:
                log(f"[{leaf}/{spec.name}] fine-tuned distillation of {', '.join(spec.ft_strategies)}")
                if helper is not None:
                    _share_ft_rows(run, cfg, splits, src, rows, circuits, helper, log)
                rows += finetune_all(run, cfg, splits, src, rows, circuits)
            report["models"] += [row.to_dict() for row in rows]
            for row in rows:
                log(f"  {row.name:<28} N={row.N:<8} test BPD {row.test_bpd:.4f}")
            built[spec.name] = (src, circuits)
        if helper is not None:
            if not helper.ch.baselines_done.is_set():
                log("waiting for the baselines in the second process")
            helper.wait_baselines(run)
        baseline_rows, baselines = run_baselines(run, cfg, splits, leaf, report["notes"])
        report["models"] += [row.to_dict() for row in baseline_rows]
        log(f"[{leaf}] experiments")
        report["experiments"][leaf] = run_experiments(run, cfg, splits, leaf, built, baselines, report)


def _share_ft_rows(
    run: RunDir,
    cfg: RunConfig,
    splits: Any,
    src: SourceModel,
    rows: list[ResultRow],
    circuits: Models,
    helper: HelperProcess,
    log: _Log,
) -> None:
    """Fine-tune the rows of ``src`` here and in the second process, each taking the next one (the
    second process joins once its baselines are done); :func:`finetune_all` then reads them all."""
    wanted = ft_sources(src, rows)
    there = helper.share_rows(run, src, wanted, lambda job: ft_row(run, cfg, splits, src, job, circuits))
    if there:
        log(f"[{src.tag}] {there} of {len(wanted)} +FT rows computed in the second process (log: {helper.log})")


def _check_data(run: RunDir, cfg: RunConfig, splits: Any, log: _Log) -> dict[str, Any]:
    """Force every stage when this folder's results were computed from other data or another seed.

    ``data.json`` records the dataset, split seed, limit and the SHA-256 of the splits' contents (not file
    times: a copied run folder stays valid), and the :data:`CACHE_SCHEMA` (a folder of another one is refused).
    Every stage reads the data, so a change recomputes them all.
    A changed record is written back only when the run finishes, so a run killed half-way through
    recomputing is recomputed again, never half-reused."""
    now = {
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "limit": cfg.limit,
        "splits_sha256": splits.fingerprint(),
        "cache_schema": CACHE_SCHEMA,
    }
    path = run.root / "data.json"
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        before = None  # a new folder (or one made before data.json existed)
    if isinstance(before, dict):
        check_schema(run, before)
        changed = sorted(k for k in now if k != "cache_schema" and before.get(k) != now[k])
        if changed:
            log(f"the data of this run folder changed ({', '.join(changed)}): every stage is recomputed")
            run.force.add("all")
    elif before is None:
        write_json(path, now)
    return now


def _previous_total(run: RunDir) -> float:
    """Wall seconds of the earlier invocations of this run directory (0 for a fresh one)."""
    path = run.root / "report.json"
    try:
        old = json.loads(path.read_text())
        return float(old.get("total_wall_seconds", old.get("wall_seconds", 0.0)))
    except (OSError, ValueError, AttributeError):
        return 0.0


def _finish_report(run: RunDir, report: dict[str, Any]) -> None:
    from vq2pc.evaluate.report import write_report

    report["notes"] = findings(report) + report["notes"]
    write_json(run.path("report.json"), report)
    write_report(run.root, report)
