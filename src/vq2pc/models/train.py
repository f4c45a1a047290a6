"""One trainer for every model vq2pc fits (VQ-VAE, prior, baselines, classifier).

Adam, a maximum number of epochs, early stopping on the validation loss, a
per-epoch atomic checkpoint (model, optimizer, best weights, RNG state) and
resume: calling :func:`fit` again with the same checkpoint path continues an
interrupted run where it stopped, and returns at once when it had finished.

Data parallel under ``torchrun`` (:mod:`vq2pc.core.distributed`): the model is wrapped in
``DistributedDataParallel``; every rank draws the same global batch order (one seed,
whatever P) and computes its contiguous slice of each global batch; the local losses are
weighted so that the averaged gradient is the global batch's; ``BatchNorm2d`` uses the
global batch's statistics (:func:`~vq2pc.core.distributed.global_batchnorm`); validation
is sharded and summed; rank 0 alone writes the checkpoint (collective atomic writes).
One process without ``torchrun`` runs exactly the single-process code path.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from vq2pc.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from vq2pc.core.distributed import (
    all_reduce_max_,
    all_reduce_sum,
    global_batchnorm,
    init_from_env,
    is_distributed,
    is_main,
    shard_range,
    world_size,
)
from vq2pc.core.optim import adam
from vq2pc.models.train_config import (
    SCHEDULES,
    Batch,
    TrainConfig,
    TrainResult,
    batches,
    completed_steps,
    dequantize_once,
    step_dequantizer,
)

__all__ = [
    "TrainConfig",
    "TrainResult",
    "SCHEDULES",
    "fit",
    "batches",
    "evaluate_loss",
    "completed_steps",
    "step_dequantizer",
    "dequantize_once",
]

LossFn = Callable[[nn.Module, Batch], Tensor]


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn: LossFn, data: Sequence[Tensor], batch_size: int, device: str) -> float:
    """Mean of ``loss_fn`` over ``data`` (weighted by batch size), in eval mode; under ``torchrun``
    each rank scores its slice of ``data`` and the sums are all-reduced."""
    model.eval()
    total, count = 0.0, 0
    lo, hi = shard_range(data[0].shape[0])
    for batch in batches([t[lo:hi] for t in data], batch_size):
        b = tuple(t.to(device) for t in batch)
        total += float(loss_fn(model, b)) * b[0].shape[0]
        count += b[0].shape[0]
    if is_distributed():
        total, count = all_reduce_sum(torch.tensor([total, count], dtype=torch.float64, device=device)).tolist()
    return total / max(count, 1)


def _check_resumable(ck: dict[str, Any], path: str | Path, meta: dict[str, Any] | None) -> None:
    """Refuse to resume from a checkpoint written for another model configuration. A setting one side
    lacks counts as None (a field added since, at its None default, is the same configuration)."""
    old, new = (ck.get("meta") or {}).get("config"), (meta or {}).get("config")
    diff = [] if old is None or new is None else sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise CheckpointError(
            f"{path} was written for another configuration (differs in {diff}); "
            "delete it or re-run with --force to train from scratch"
        )


class _Step(nn.Module):
    """``forward(*batch) = loss_fn(model, batch)``: the training step that DDP and ``torch.compile`` wrap
    (DDP syncs gradients only for work done inside its ``forward``)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, *batch: Tensor) -> Tensor:
        return self.loss_fn(self.model, batch)


def _wrap(model: nn.Module, loss_fn: LossFn, cfg: TrainConfig, device: str) -> nn.Module:
    """The training step: DDP under ``torchrun``, compiled with ``cfg.compile``."""
    step: nn.Module = _Step(model, loss_fn)
    if is_distributed():
        dev = torch.device(device)
        step = DistributedDataParallel(
            step, device_ids=[dev.index] if dev.type == "cuda" else None, find_unused_parameters=True
        )
    return torch.compile(step) if cfg.compile else step


def _autocast(cfg: TrainConfig, device: str) -> tuple[Any, Any]:
    """(autocast context factory, GradScaler or None) for ``cfg.amp``; refuses AMP off CUDA."""
    if cfg.amp is None:
        return contextlib.nullcontext, None
    if cfg.amp not in ("bf16", "fp16"):
        raise ValueError(f"amp must be 'bf16', 'fp16' or None, got {cfg.amp!r}")
    if torch.device(device).type != "cuda":
        raise ValueError(f"--amp {cfg.amp} needs a CUDA device (training runs on {device!r}); drop --amp on CPU")
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def _local(batch: Batch) -> tuple[Batch, float, int]:
    """This rank's contiguous rows of a global batch, the factor on its mean loss that makes the
    DDP-averaged gradient the global batch's (``n_r·P / n``), and ``n_r``. A rank left without rows
    (a last batch smaller than P) computes on one stand-in row with factor 0."""
    n = batch[0].shape[0]
    lo, hi = shard_range(n)
    if hi > lo:
        return tuple(t[lo:hi] for t in batch), (hi - lo) * world_size() / n, hi - lo
    return tuple(t[:1] for t in batch), 0.0, 0


def _global_mean(loss: Tensor, rows: int, n: int) -> float:
    """The global batch's mean loss (this rank's ``loss`` in one process)."""
    if not is_distributed():
        return loss.item()
    return float(all_reduce_sum(loss.detach().double() * rows)) / n


def _agree(flag: bool, device: str) -> bool:
    """True on every rank when it is true on any (ranks stop together)."""
    if not is_distributed():
        return flag
    return bool(all_reduce_max_(torch.tensor([float(flag)], device=device)))


class _Loop:
    """One :func:`fit` run's changing parts: optimizer, learning-rate schedule, batch-order generator,
    the training state (epochs, best validation loss, history, time) and the best weights."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, steps_per_epoch: int) -> None:
        self.model, self.cfg, self.steps_per_epoch = model, cfg, steps_per_epoch
        self.opt = adam(model.parameters(), cfg.lr)
        self.sched = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=cfg.epochs * steps_per_epoch)
            if cfg.schedule == "cosine"
            else None
        )
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.state: dict[str, Any] = {
            "epoch": 0,
            "best": math.inf,
            "best_epoch": 0,
            "start": None,
            "bad": 0,
            "done": False,
            "history": [],
            "seconds": 0.0,
        }
        self.best_state = _copy_state(model)

    def resume(self, checkpoint: str | Path, kind: str, meta: dict[str, Any] | None) -> bool:
        """Continue from ``checkpoint`` if it holds an interrupted (or finished) run; False if there is none."""
        if not Path(checkpoint).exists():
            return False
        ck = load_checkpoint(checkpoint, kind)
        if "train_state" not in ck:
            return False
        _check_resumable(ck, checkpoint, meta)
        try:
            self.model.load_state_dict(ck["last_state_dict"])
            self.opt.load_state_dict(ck["optimizer"])
            if self.sched is not None:
                self.sched.load_state_dict(ck["schedule"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"{checkpoint} does not fit this model ({str(exc).splitlines()[0]}); "
                "delete it or re-run with --force to train from scratch"
            ) from None
        self.gen.set_state(ck["rng"])
        self.state = {**self.state, **ck["train_state"]}
        self.best_state = ck["state_dict"]
        # "done" is judged by this call's budget: a larger `epochs` continues a finished run.
        self.state["done"] = self.state["bad"] >= self.cfg.patience or self._out_of_time()
        return True

    def _out_of_time(self) -> bool:
        return self.cfg.max_seconds is not None and self.state["seconds"] > self.cfg.max_seconds

    def apply(self, scaler: Any) -> None:
        """The optimizer step on the gradients just computed (clipped with ``cfg.clip``), then the schedule's."""
        if self.cfg.clip is not None:
            if scaler is not None:
                scaler.unscale_(self.opt)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        if scaler is None:
            self.opt.step()
        else:
            scaler.step(self.opt)
            scaler.update()
        if self.sched is not None:
            self.sched.step()

    def record(self, train: float, val: float, device: str) -> None:
        """The end of an epoch: its losses, the best weights, whether training is done."""
        state = self.state
        state["epoch"] += 1
        state["history"].append(
            {"epoch": state["epoch"], "train": train, "val": val, "lr": self.opt.param_groups[0]["lr"]}
        )
        if val < state["best"]:
            state["best"], state["best_epoch"], state["bad"] = val, state["epoch"], 0
            self.best_state = _copy_state(self.model)
        else:
            state["bad"] += 1
        out_of_time = _agree(self._out_of_time(), device)
        state["done"] = state["bad"] >= self.cfg.patience or state["epoch"] >= self.cfg.epochs or out_of_time

    def save(self, checkpoint: str | Path, kind: str, meta: dict[str, Any] | None) -> None:
        save_checkpoint(
            checkpoint,
            kind,
            {
                "meta": meta or {},
                "state_dict": self.best_state,
                "last_state_dict": self.model.state_dict(),
                "optimizer": self.opt.state_dict(),
                "rng": self.gen.get_state(),
                "train_state": self.state,
                "train_config": asdict(self.cfg),
                **({"schedule": self.sched.state_dict()} if self.sched else {}),
            },
        )

    def result(self) -> TrainResult:
        state, cfg = self.state, self.cfg
        return TrainResult(
            best_val_loss=float(state["best"]),
            epochs_run=int(state["epoch"]),
            stopped_early=state["bad"] >= cfg.patience,
            seconds=float(state["seconds"]),
            history=list(state["history"]),
            best_epoch=int(state["best_epoch"]),
            start_val_loss=state["start"],
            time_capped=bool(self._out_of_time() and state["bad"] < cfg.patience and state["epoch"] < cfg.epochs),
        )


def _copy_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_epoch(
    loop: _Loop,
    step: nn.Module,
    train_data: Sequence[Tensor],
    device: str,
    autocast: Any,
    scaler: Any,
    prepare: Callable[[Batch], Batch] | None,
    before_step: Callable[[int, int], None] | None,
    desc: str,
) -> float:
    """One epoch of training steps (see :func:`fit`); returns the mean training loss of its batches."""
    loop.model.train()
    losses = []
    for i, batch in enumerate(batches(train_data, loop.cfg.batch_size, loop.gen)):
        if before_step is not None:
            before_step(loop.state["epoch"] * loop.steps_per_epoch + i, i)
        b = tuple(t.to(device) for t in batch)
        local, weight, rows = _local(prepare(b) if prepare is not None else b)
        with autocast():
            loss = step(*local)
        losses.append(_global_mean(loss, rows, b[0].shape[0]))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{desc}: loss became {losses[-1]} at epoch {loop.state['epoch'] + 1}")
        loop.opt.zero_grad(set_to_none=True)
        scaled = loss if weight == 1.0 else loss * weight
        (scaled if scaler is None else scaler.scale(scaled)).backward()
        loop.apply(scaler)
    return sum(losses) / len(losses)


def _setup(model: nn.Module, cfg: TrainConfig) -> tuple[str, Any, Any]:
    """The device (joining the ``torchrun`` process group, if any), with ``model`` moved onto it, and
    the autocast context factory and GradScaler of ``cfg.amp``."""
    device = init_from_env(cfg.device)
    autocast, scaler = _autocast(cfg, device)
    model.to(device)
    return device, autocast, scaler


def _validation(
    model: nn.Module,
    loss_fn: LossFn,
    val_data: Sequence[Tensor],
    cfg: TrainConfig,
    device: str,
    validate: Callable[[nn.Module], float] | None,
) -> Callable[[], float]:
    """The validation loss of ``model``'s current weights: ``validate(model)``, else the mean ``loss_fn``."""
    if validate is not None:
        return lambda: validate(model)
    return lambda: evaluate_loss(model, loss_fn, val_data, max(cfg.batch_size, 256), device)


def _resume_or_score(
    loop: _Loop,
    checkpoint: str | Path | None,
    kind: str,
    meta: dict[str, Any] | None,
    score: Callable[[], float] | None,
) -> None:
    """Continue from ``checkpoint`` when it holds a run; else, with ``score``, validate the starting weights
    (they are kept unless an epoch beats them)."""
    if not (checkpoint is not None and loop.resume(checkpoint, kind, meta)) and score is not None:
        loop.state["start"] = loop.state["best"] = score()


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    train_data: Sequence[Tensor],
    val_data: Sequence[Tensor],
    cfg: TrainConfig,
    checkpoint: str | Path | None = None,
    kind: str = "model",
    meta: dict[str, Any] | None = None,
    desc: str = "train",
    prepare: Callable[[Batch], Batch] | None = None,
    validate: Callable[[nn.Module], float] | None = None,
    before_step: Callable[[int, int], None] | None = None,
    score_start: bool = False,
) -> TrainResult:
    """Train ``model`` in place; at the end it holds the weights of the best validation epoch.

    ``loss_fn(model, batch)`` returns the mean loss of a batch (tensors already on
    ``cfg.device``). ``prepare`` (optional) maps each global training batch, on the device,
    before it is split over ranks (e.g. per-step dequantization noise, so the noise of a row is
    the same whatever P). ``checkpoint`` (optional) is written atomically after every
    epoch as a ``vq2pc/<kind>`` checkpoint holding ``meta`` as well, so
    ``load_checkpoint(path, kind)["state_dict"]`` is the best model.

    Hooks: ``validate(model)`` replaces the mean ``loss_fn`` over ``val_data`` as the validation loss
    (lower is better; every rank calls it). ``before_step(step, index)`` runs before each training step
    with the number of steps run before it and the batch's index in its epoch (both the same after a
    resume). ``score_start``: the starting weights are validated first, and kept (``best_epoch`` 0)
    unless an epoch beats them.
    Under ``torchrun`` every rank calls ``fit`` (see the module docstring).
    """
    device, autocast, scaler = _setup(model, cfg)
    loop = _Loop(model, cfg, math.ceil(train_data[0].shape[0] / cfg.batch_size))
    score = _validation(model, loss_fn, val_data, cfg, device, validate)
    _resume_or_score(loop, checkpoint, kind, meta, score if score_start else None)
    start = time.perf_counter() - loop.state["seconds"]
    bar = tqdm(
        total=cfg.epochs, initial=loop.state["epoch"], desc=desc, disable=not (cfg.progress and is_main()), leave=False
    )
    with global_batchnorm(model):
        step = _wrap(model, loss_fn, cfg, device)
        while not loop.state["done"] and loop.state["epoch"] < cfg.epochs:
            train = _train_epoch(loop, step, train_data, device, autocast, scaler, prepare, before_step, desc)
            val = score()
            loop.state["seconds"] = time.perf_counter() - start
            loop.record(train, val, device)
            bar.update(1)
            bar.set_postfix(train=f"{loop.state['history'][-1]['train']:.4g}", val=f"{val:.4g}")
            if checkpoint is not None:
                loop.save(checkpoint, kind, meta)
    bar.close()
    model.load_state_dict(loop.best_state)
    model.eval()
    return loop.result()
