"""Pipeline stage ``distill``: every circuit of a source model (each strategy × N, the exact model and the
+EM rows), saved in the run folder and scored on the test set."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import torch

from vq2pc.circuit.exact import ExactModel
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.circuit.refine import EMConfig, em_refine
from vq2pc.data.datasets import DataSplits, to_model_space
from vq2pc.latents.selection import SelectionShortfall
from vq2pc.pipeline.config import RunConfig
from vq2pc.pipeline.models import (
    FAMILY,
    SourceModel,
    beam_starts,
    circuit_row,
    distill_params,
    floor_tags,
    leaf_params,
    make_circuit,
    refined_row,
    score_test,
    select_latents,
    selections,
)
from vq2pc.pipeline.rows import ResultRow
from vq2pc.pipeline.rundir import Models, RunDir

__all__ = ["distill_all", "exact_row", "em_row"]


def exact_row(run: RunDir, cfg: RunConfig, splits: DataSplits, src: SourceModel) -> ResultRow:
    """Test BPD of the exact model streamed over the latent space (too large to store as a circuit)."""
    limit = cfg.exact_test_limit or cfg.test_limit
    test_x = splits.test_x[:limit] if limit else splits.test_x

    def compute() -> dict[str, Any]:
        start = time.perf_counter()  # the enumeration of log p(z) is ExM's selection
        model = ExactModel(
            src.vqvae,
            src.prior,
            max_space=cfg.max_exhaustive,
            device=cfg.device,
            progress=True,
            std_floor=src.spec.std_floor,
        )
        seconds = time.perf_counter() - start
        bpd = score_test(cfg, model, test_x, src.leaf, splits.levels)
        return circuit_row(
            f"ExM {src.spec.name} (K={src.spec.K}){floor_tags(src.spec)[1]}",
            "ExM",
            model,
            bpd,
            selection="exhaustive",
            std_floor=src.spec.std_floor,
            model=src.spec.name,
            leaf=src.leaf,
            group=src.spec.group or src.spec.name,
            K=src.spec.K,
            source_params=src.info["vqvae_params"],
            test_images=len(test_x),
            streamed=True,
            prior=src.spec.prior,
            selection_seconds=round(seconds, 3),
        ).to_dict()

    return ResultRow.from_dict(
        run.cached(
            "distill",
            f"{src.leaf}/{src.spec.name}/exhaustive{floor_tags(src.spec)[0]}",
            compute,
            depends=src.files,
            params=distill_params(cfg, src.spec),
        )
    )


def _circuit_label(src: SourceModel, strategy: str) -> str:
    """The report name of a distilled circuit of ``src`` (without its std-floor tag)."""
    return (
        f"{FAMILY[strategy]} {src.spec.name}"
        + (f" (K={src.spec.K})" if strategy == "exhaustive" else "")
        + (" (stochastic)" if strategy == "beam" and src.spec.beam_search == "stochastic" else "")
    )


def _distill_record(
    run: RunDir,
    cfg: RunConfig,
    splits: DataSplits,
    src: SourceModel,
    strategy: str,
    N: int | None,
    path: Path,
    test_x: torch.Tensor,
) -> dict[str, Any]:
    """Select, distill, save to ``path`` and score one circuit: its report row as a dict, or ``{"skipped": why}``
    when the selection cannot find ``N`` distinct latents (remembered, so a re-run does not search again)."""
    try:
        selection, seconds = select_latents(src, cfg, strategy, N)
        circuit = make_circuit(src, cfg, strategy, N, selection)
    except SelectionShortfall as exc:
        return {"skipped": f"{FAMILY[strategy]} {src.spec.name} N={N} ({src.leaf} pixels) was skipped: {exc}"}
    circuit.meta.update({"image_shape": list(splits.image_shape), "levels": splits.levels})
    circuit.save(path)
    bpd = score_test(cfg, circuit, test_x, src.leaf, splits.levels)
    beam = strategy == "beam"
    return circuit_row(
        _circuit_label(src, strategy) + floor_tags(src.spec)[1],
        FAMILY[strategy],
        circuit,
        bpd,
        selection=strategy,
        model=src.spec.name,
        leaf=src.leaf,
        std_floor=src.spec.std_floor,
        group=src.spec.group or src.spec.name,
        K=src.spec.K,
        source_params=src.info["vqvae_params"],
        requested_N=N,
        starts=beam_starts(src, N) if beam else None,
        beam_score=src.spec.beam_score if beam else None,
        beam_search=src.spec.beam_search if beam else None,
        test_images=len(test_x),
        circuit_file=str(path.relative_to(run.root)),
        shortfall_reason=circuit.meta.get("shortfall_reason"),
        prior=src.spec.prior,
        selection_seconds=round(seconds, 3),
    ).to_dict()


def _add_circuit(
    run: RunDir,
    cfg: RunConfig,
    splits: DataSplits,
    src: SourceModel,
    pair: tuple[str, int | None],
    test_x: torch.Tensor,
    circuits: Models,
    notes: list[str],
) -> list[ResultRow]:
    """The rows of one (strategy, N) circuit (cached): its own and its +EM twin's, the circuit added to
    ``circuits``; none when the selection fell short (a line in ``notes`` says so)."""
    strategy, N = pair
    key = (f"{strategy}" if N is None else f"{strategy}-N{N}") + floor_tags(src.spec)[0]
    path = run.path(src.leaf, src.spec.name, "circuits", f"{key}.safetensors")
    record = run.cached(
        "distill",
        f"{src.leaf}/{src.spec.name}/{key}",
        functools.partial(_distill_record, run, cfg, splits, src, strategy, N, path, test_x),
        outputs=(path,),
        depends=src.files,
        params=distill_params(cfg, src.spec, strategy=strategy),
    )
    if "skipped" in record:
        notes.append(record["skipped"])
        return []
    row = ResultRow.from_dict(record)
    if row.shortfall_reason:
        notes.append(
            f"{row.name} N={row.requested_N} ({src.leaf} pixels) has {row.N} components: {row.shortfall_reason}"
        )
    circuits.add_file(key, path, row.N)
    if strategy not in src.spec.em_strategies:
        return [row]
    return [row, em_row(run, cfg, splits, src, key, circuits[key], row, test_x)]


def distill_all(
    run: RunDir, cfg: RunConfig, splits: DataSplits, src: SourceModel, notes: list[str]
) -> tuple[list[ResultRow], Models]:
    """Every (strategy, N) circuit of ``src``: saved, evaluated on the test set; returns report rows and the circuit files.

    A selection that cannot find N distinct latents (DMRS on a prior whose mass sits on fewer) is
    skipped with a line in ``notes``; the other circuits are still made.

    An exhaustive selection whose circuit would hold more than ``cfg.max_materialize`` parameters is
    evaluated by streaming (:class:`ExactModel`) and not stored, so it is not among the returned circuits.
    """
    rows, circuits = [], Models(cfg.device)
    test_x = splits.test_x[: cfg.test_limit] if cfg.test_limit else splits.test_x
    per_component = leaf_params(src.leaf, splits.num_variables, splits.levels)
    for strategy, N in selections(src, cfg, notes):
        if strategy == "exhaustive" and src.info["latent_space"] * per_component > cfg.max_materialize:
            rows.append(exact_row(run, cfg, splits, src))
        else:
            rows += _add_circuit(run, cfg, splits, src, (strategy, N), test_x, circuits, notes)
    return rows, circuits


def em_row(
    run: RunDir,
    cfg: RunConfig,
    splits: DataSplits,
    src: SourceModel,
    key: str,
    circuit: MixtureCircuit,
    row: ResultRow,
    test_x: torch.Tensor,
) -> ResultRow:
    """The circuit ``key`` refined by EM on training data (beyond the paper), saved and evaluated."""
    spec = src.spec
    path = run.path(src.leaf, spec.name, "circuits", f"{key}-em.safetensors")
    source = run.path(src.leaf, spec.name, "circuits", f"{key}.safetensors")

    def compute() -> dict[str, Any]:
        v = splits.train_x[: spec.em_train_limit] if spec.em_train_limit else splits.train_x
        x = to_model_space(v, src.leaf, splits.levels, torch.Generator().manual_seed(cfg.seed)).to(cfg.device)
        em_cfg = EMConfig(iterations=spec.em_iterations, leaves=spec.em_leaves, prior_strength=spec.em_prior_strength)
        refined, history = em_refine(circuit, x, em_cfg)
        refined.save(path)
        bpd = score_test(cfg, refined, test_x, src.leaf, splits.levels)
        return refined_row(
            row, "+EM", refined, bpd, em_history=history, circuit_file=str(path.relative_to(run.root))
        ).to_dict()

    em = ("em_iterations", "em_leaves", "em_prior_strength", "em_train_limit")
    return ResultRow.from_dict(
        run.cached(
            "distill",
            f"{src.leaf}/{spec.name}/{key}-em",
            compute,
            outputs=(path,),
            depends=(source,),
            params=distill_params(cfg, spec, *em, strategy=row.selection),
        )
    )
