"""Pipeline stage: the paper's baselines (EiNet, continuous mixture) on the same data and splits.

They read only the data, so ``vq2pc run --jobs 2`` trains them in a second process
(:class:`vq2pc.pipeline.helper.HelperProcess`) while the first one trains the VQ-VAE and prior and
distills; the first process then reads their cached results.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from vq2pc.baselines.cm import CMConfig, compile_cm, train_cm
from vq2pc.baselines.einet import EiNetConfig, train_einet
from vq2pc.circuit.cirkit import require_cirkit
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core.files import write_json
from vq2pc.data.datasets import DataSplits
from vq2pc.evaluate.density import BPD_FORMAT, bpd_fields, save_per_image, test_bpd
from vq2pc.models.train import TrainConfig, TrainResult
from vq2pc.pipeline.config import BaselineSpec, CircuitSpec, RunConfig
from vq2pc.pipeline.models import score_test, score_val
from vq2pc.pipeline.rows import ResultRow
from vq2pc.pipeline.rundir import RunDir, settings_key

__all__ = ["run_baselines", "fit_circuit"]


def _bpd_row(
    run: RunDir, cfg: RunConfig, splits: DataSplits, leaf: str, key: str, model: Any, depends: Path, **fields: Any
) -> ResultRow:
    test_x = splits.test_x[: cfg.test_limit] if cfg.test_limit else splits.test_x
    val_x = splits.val_x[: cfg.test_limit] if cfg.test_limit else splits.val_x

    def compute() -> dict[str, Any]:
        bpd = score_test(cfg, model, test_x, leaf, splits.levels)
        val = score_val(cfg, model, val_x, leaf, splits.levels)
        return ResultRow.build(**fields, leaf=leaf, **bpd_fields(bpd), val_bpd=val, test_images=len(test_x)).to_dict()

    params = {
        "baselines": settings_key(cfg.baselines),
        "train": settings_key(cfg.baseline_train, drop=("progress", "device", "compile")),
        "seed": cfg.seed,
        "test_limit": cfg.test_limit,
        "bpd_draws": cfg.experiments.bpd_draws,
        "bpd_format": BPD_FORMAT,
        "bpd_discrete": cfg.experiments.bpd_discrete,
        "val_bpd": True,
    }
    return ResultRow.from_dict(
        run.cached("baselines", f"{leaf}/baselines/{key}", compute, depends=(depends,), params=params)
    )


def _cm_config(spec: BaselineSpec, splits: DataSplits, leaf: str, seed: int) -> CMConfig:
    """The CM of ``spec``: the MLP recipe, or the paper recipe over a grid of ``cm_points`` (seeded by the run)."""
    common = {
        "image_shape": tuple(splits.image_shape),
        "leaf": leaf,
        "levels": splits.levels,
        "latent_dim": spec.cm_latent_dim,
    }
    if spec.cm_recipe != "paper":
        return CMConfig(**common, hidden=spec.cm_hidden, train_points=spec.cm_train_points)
    paper = {"channels": spec.cm_channels, "refresh": spec.cm_refresh, "top_k": spec.cm_top_k}
    return CMConfig(
        **common,
        recipe="paper",
        points=spec.cm_points,
        grid_seed=seed,
        **{k: v for k, v in paper.items() if v is not None},
    )


def _time_cap(result: TrainResult, train: TrainConfig, name: str, notes: list[str]) -> float | None:
    """``train.max_seconds`` when that wall-time cap ended the training (then a note says so), else None:
    a capped result depends on the machine's speed, not only on the seed."""
    if result.time_capped:
        notes.append(
            f"{name} stopped at the time cap (max_seconds={train.max_seconds:g}) after {result.epochs_run} "
            f"of {train.epochs} epochs: its numbers depend on the machine's speed"
        )
    return train.max_seconds if result.time_capped else None


def _einet_available(notes: list[str]) -> bool:
    """Whether libcirkit is installed; a note for the report when it is not."""
    try:
        require_cirkit()
    except ModuleNotFoundError as exc:
        notes.append(f"EiNet baseline skipped: {exc}")
        return False
    return True


_FAMILIES = {
    "poon-domingos": "EiNet",
    "quad-graph": "QuadGraph",
    "quad-tree-2": "QuadTree",
    "quad-tree-4": "QuadTree",
    "chow-liu-tree": "HCLT",
}


def _circuit_specs(spec: BaselineSpec, splits: DataSplits, leaf: str) -> list[tuple[str, str, str, EiNetConfig]]:
    """``(key, name, family, config)`` of every libcirkit baseline: the EiNets (pieces × inputs, Tucker
    layers) and the ``circuits`` (QuadGraph, HCLT, ...)."""
    shape = dict(image_shape=tuple(splits.image_shape), leaf=leaf, levels=splits.levels)
    out = []
    if spec.einet:
        out += [
            (
                f"einet-p{p}-I{i}",
                f"EiNet (PD {p}, I={i})",
                "EiNet",
                EiNetConfig(**shape, pieces=(p,), num_input_units=i, num_sum_units=i),
            )
            for p in spec.einet_pieces
            for i in spec.einet_inputs
        ]
    return out + [_circuit_spec(c, splits, leaf) for c in spec.circuits]


def _circuit_spec(c: CircuitSpec, splits: DataSplits, leaf: str) -> tuple[str, str, str, EiNetConfig]:
    """``(key, name, family, config)`` of one libcirkit circuit baseline (QuadGraph, HCLT, ...)."""
    family = _FAMILIES[c.region_graph]
    config = EiNetConfig(
        image_shape=tuple(splits.image_shape),
        leaf=leaf,
        levels=splits.levels,
        region_graph=c.region_graph,
        sum_product=c.sum_product,
        num_input_units=c.units,
        num_sum_units=c.units,
        pic_net_dim=c.pic_net_dim,
    )
    pic = f"-pic{c.pic_net_dim}" if c.pic_net_dim else ""
    return (
        f"{c.region_graph}-{c.sum_product}-{c.units}{pic}",
        f"{family} ({c.sum_product.upper()}, {c.units}{', PIC' if pic else ''})",
        "PIC" if pic else family,
        config,
    )


def _circuit_baselines(
    run: RunDir, cfg: RunConfig, splits: DataSplits, leaf: str, train_cfg: TrainConfig, notes: list[str]
) -> tuple[list[ResultRow], dict[str, Any]]:
    """The libcirkit baselines (EiNets and ``circuits``), each trained (or resumed) from its checkpoint."""
    rows, models = [], {}
    for key, name, family, ecfg in _circuit_specs(cfg.baselines, splits, leaf):
        ckpt = run.checkpoint("baselines", leaf, "baselines", f"{key}.pt")
        model, res = train_einet(splits, ecfg, train_cfg, checkpoint=ckpt)
        rows.append(
            _bpd_row(
                run,
                cfg,
                splits,
                leaf,
                key,
                model,
                ckpt,
                name=name,
                family=family,
                selection=family.lower(),
                N=ecfg.num_input_units,
                num_params=model.num_params,
                **res.summary(),
                time_cap_fired=_time_cap(res, train_cfg, f"{name} ({leaf})", notes),
            )
        )
        models[name] = model
    return rows, models


def _cm_baseline(
    run: RunDir, cfg: RunConfig, splits: DataSplits, leaf: str, train_cfg: TrainConfig, notes: list[str]
) -> tuple[ResultRow, MixtureCircuit]:
    """The continuous mixture: trained (or resumed), compiled into a circuit of ``cm_points`` components
    (saved in the run folder, remade when the training checkpoint changed) and scored."""
    spec = cfg.baselines
    ccfg = _cm_config(spec, splits, leaf, cfg.seed)
    ckpt = run.checkpoint("baselines", leaf, "baselines", "cm.pt")
    cm_train = replace(train_cfg, batch_size=spec.cm_batch_size or train_cfg.batch_size)
    model, res = train_cm(splits, ccfg, cm_train, checkpoint=ckpt)
    capped = _time_cap(res, cm_train, f"CM ({leaf})", notes)
    path = run.path(leaf, "baselines", "cm.safetensors")
    if run.outdated("baselines", path, (ckpt,)):
        circuit = compile_cm(model, num_points=spec.cm_points, seed=cfg.seed)
        circuit.meta.update({"image_shape": list(splits.image_shape), "levels": splits.levels, "leaf": leaf})
        circuit.save(path)
        run.redone.add(path)
    circuit = MixtureCircuit.load(path, device=cfg.device)
    row = _bpd_row(
        run,
        cfg,
        splits,
        leaf,
        "cm",
        circuit,
        path,
        name=f"CM (M={spec.cm_points})",
        family="CM",
        selection="cm",
        N=len(circuit),
        num_params=circuit.num_params,
        recipe=ccfg.recipe,
        source_params=model.num_params,
        circuit_file=str(path.relative_to(run.root)),
        **res.summary(),
        time_cap_fired=capped,
    )
    return row, circuit


def run_baselines(
    run: RunDir, cfg: RunConfig, splits: DataSplits, leaf: str, notes: list[str]
) -> tuple[list[ResultRow], dict[str, Any]]:
    """Train (or resume/load) every configured baseline for ``leaf``; returns report rows and the models by name.

    Skipped baselines (bernoulli pixels, libcirkit missing) are explained in ``notes``.
    """
    spec, rows, models = cfg.baselines, [], {}
    if leaf == "bernoulli":
        notes.append("baselines are not run for bernoulli pixels")
        return rows, models
    train_cfg = replace(cfg.baseline_train, seed=cfg.seed, device=cfg.device)
    if (spec.einet or spec.circuits) and _einet_available(notes):
        rows, models = _circuit_baselines(run, cfg, splits, leaf, train_cfg, notes)
    if spec.cm:
        row, models["CM"] = _cm_baseline(run, cfg, splits, leaf, train_cfg, notes)
        rows.append(row)
    return rows, models


def fit_circuit(
    splits: DataSplits, spec: CircuitSpec, leaf: str, train: TrainConfig, out: Path, bpd_draws: int = 1
) -> dict[str, Any]:
    """Train one libcirkit circuit baseline outside a run (``vq2pc train-baseline``), resumable from
    ``out/<key>.pt``; score it on the validation and test splits with the report's :func:`test_bpd` and
    write the row to ``out/<key>.json``; ``key`` names the structure (``quad-graph-cp-64``), plus ``-gaussian``
    for Gaussian leaves and ``-seed<n>`` for a seed other than 0, so one folder holds them all. Returns the row."""
    key, name, family, ecfg = _circuit_spec(spec, splits, leaf)
    key += ("-gaussian" if leaf == "gaussian" else "") + (f"-seed{train.seed}" if train.seed else "")
    out.mkdir(parents=True, exist_ok=True)
    model, res = train_einet(splits, ecfg, train, checkpoint=out / f"{key}.pt")
    model.eval()
    score = functools.partial(test_bpd, model, leaf_kind=leaf, levels=splits.levels, draws=bpd_draws)
    with torch.no_grad():
        val, test = (
            score(splits.val_x, generator=torch.Generator().manual_seed(train.seed)),
            score(splits.test_x, generator=torch.Generator().manual_seed(train.seed)),
        )
    row = {
        "name": name,
        "family": family,
        "leaf": leaf,
        **asdict(spec),
        "num_params": model.num_params,
        "val_bpd": val["mean"],
        **bpd_fields(test),
        "test_images": len(splits.test_x),
        **res.summary(),
        "seed": train.seed,
        "lr": train.lr,
        "batch_size": train.batch_size,
        "history": res.history,
    }
    save_per_image(out / f"{key}.test_bpd.npy", test["per_image"])
    write_json(out / f"{key}.json", row)
    return row
