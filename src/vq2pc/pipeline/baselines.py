"""Pipeline stage: the paper's baselines (EiNet, continuous mixture) on the same data and splits.

They read only the data, so ``vq2pc run --jobs 2`` trains them in a second process
(:class:`vq2pc.pipeline.helper.HelperProcess`) while the first one trains the VQ-VAE and prior and
distills; the first process then reads their cached results.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from vq2pc.baselines.cm import CMConfig, compile_cm, train_cm
from vq2pc.baselines.einet import EiNetConfig, train_einet
from vq2pc.circuit.cirkit import require_cirkit
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.data.datasets import DataSplits
from vq2pc.evaluate.density import BPD_FORMAT, bpd_fields, test_bpd
from vq2pc.models.train import TrainConfig, TrainResult
from vq2pc.pipeline.config import RunConfig
from vq2pc.pipeline.rundir import RunDir, settings_key

__all__ = ["run_baselines"]


def _bpd_row(run: RunDir, cfg: RunConfig, splits: DataSplits, leaf: str, key: str, model: Any, depends: Path,
             **row: Any) -> dict:
    test_x = splits.test_x[: cfg.test_limit] if cfg.test_limit else splits.test_x

    def compute() -> dict[str, Any]:
        bpd = test_bpd(model, test_x, leaf, splits.levels, draws=cfg.experiments.bpd_draws,
                       discrete=cfg.experiments.bpd_discrete, generator=torch.Generator().manual_seed(cfg.seed))
        return {**row, "leaf": leaf, **bpd_fields(bpd), "test_images": len(test_x)}

    params = {"baselines": settings_key(cfg.baselines, added_later=("cm_batch_size",)),
              "train": settings_key(cfg.baseline_train, drop=("progress", "device", "compile"), added_later=("amp",)),
              "seed": cfg.seed, "test_limit": cfg.test_limit, "bpd_draws": cfg.experiments.bpd_draws,
              "bpd_format": BPD_FORMAT, **cfg.experiments.discrete_key()}
    return run.cached("baselines", f"{leaf}/baselines/{key}", compute, depends=(depends,), params=params)


def _time_cap(result: TrainResult, train: TrainConfig, name: str, notes: list[str]) -> float | None:
    """``train.max_seconds`` when that wall-time cap ended the training (then a note says so), else None:
    a capped result depends on the machine's speed, not only on the seed."""
    if result.time_capped:
        notes.append(f"{name} stopped at the time cap (max_seconds={train.max_seconds:g}) after {result.epochs_run} "
                     f"of {train.epochs} epochs: its numbers depend on the machine's speed")
    return train.max_seconds if result.time_capped else None


def _einet_available(notes: list[str]) -> bool:
    """Whether libcirkit is installed; a note for the report when it is not."""
    try:
        require_cirkit()
    except ModuleNotFoundError as exc:
        notes.append(f"EiNet baseline skipped: {exc}")
        return False
    return True


def run_baselines(
    run: RunDir, cfg: RunConfig, splits: DataSplits, leaf: str, notes: list[str]
) -> tuple[list[dict], dict[str, Any]]:
    """Train (or resume/load) every configured baseline for ``leaf``; returns report rows and the models by name.

    Skipped baselines (bernoulli pixels, libcirkit missing) are explained in ``notes``.
    """
    spec, rows, models = cfg.baselines, [], {}
    if leaf == "bernoulli":
        notes.append("baselines are not run for bernoulli pixels")
        return rows, models
    train_cfg = replace(cfg.baseline_train, seed=cfg.seed, device=cfg.device)
    if spec.einet and _einet_available(notes):
        for pieces in spec.einet_pieces:
            for units in spec.einet_inputs:
                key = f"einet-p{pieces}-I{units}"
                ecfg = EiNetConfig(image_shape=tuple(splits.image_shape), leaf=leaf, levels=splits.levels,
                                   pieces=(pieces,), num_input_units=units, num_sum_units=units)
                ckpt = run.checkpoint("baselines", leaf, "baselines", f"{key}.pt")
                model, res = train_einet(splits, ecfg, train_cfg, checkpoint=ckpt)
                name = f"EiNet (PD {pieces}, I={units})"
                rows.append(_bpd_row(run, cfg, splits, leaf, key, model, ckpt, name=name, family="EiNet", selection="einet",
                                     N=units, num_params=model.num_params, **res.summary(),
                                     time_cap_fired=_time_cap(res, train_cfg, f"{name} ({leaf})", notes)))
                models[name] = model
    if spec.cm:
        ccfg = CMConfig(image_shape=tuple(splits.image_shape), leaf=leaf, levels=splits.levels,
                        latent_dim=spec.cm_latent_dim, hidden=spec.cm_hidden, train_points=spec.cm_train_points)
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
        rows.append(_bpd_row(run, cfg, splits, leaf, "cm", circuit, path, name=f"CM (M={spec.cm_points})", family="CM",
                             selection="cm", N=len(circuit), num_params=circuit.num_params,
                             source_params=model.num_params, circuit_file=str(path.relative_to(run.root)),
                             **res.summary(), time_cap_fired=capped))
        models["CM"] = circuit
    return rows, models
