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
from dataclasses import asdict, dataclass, field
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
from vq2pc.core.random import step_seed
from vq2pc.core.validate import is_positive_number
from vq2pc.data.datasets import to_model_space

__all__ = ["TrainConfig", "TrainResult", "fit", "batches", "evaluate_loss", "completed_steps", "step_dequantizer",
           "dequantize_once"]

Batch = tuple[Tensor, ...]
LossFn = Callable[[nn.Module, Batch], Tensor]


@dataclass
class TrainConfig:
    """Optimization settings shared by every trainer."""

    epochs: int = 30
    patience: int = 15
    lr: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    max_seconds: float | None = None  # stop (keeping the best weights) after this wall time
    amp: str | None = None  # "bf16" or "fp16": autocast on CUDA (refused on other devices)
    compile: bool = False  # torch.compile the training step

    def __post_init__(self) -> None:
        """Impossible settings fail here, when the config is built, not an epoch into training."""
        for name, low in (("epochs", 1), ("patience", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("lr", "max_seconds"):
            value = getattr(self, name)
            if (value is not None or name == "lr") and not is_positive_number(value):
                raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass
class TrainResult:
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    time_capped: bool = False  # training ended because ``max_seconds`` ran out (not by early stopping or epochs)

    def summary(self) -> dict[str, Any]:
        """The JSON-able record a report gives of this training: its cost and how it ended."""
        return {"train_seconds": round(self.seconds, 3), "train_epochs": self.epochs_run,
                "stopped_early": self.stopped_early, "time_capped": self.time_capped}


def batches(data: Sequence[Tensor], batch_size: int, generator: torch.Generator | None = None) -> list[Batch]:
    """Split tensors of equal first dimension into (shuffled if ``generator``) mini-batches."""
    n = data[0].shape[0]
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [tuple(t[order[i : i + batch_size]] for t in data) for i in range(0, n, batch_size)]


def completed_steps(checkpoint: str | Path | None, kind: str, num_train: int, batch_size: int) -> int:
    """Training steps already run by an interrupted :func:`fit` with this checkpoint (0 if none): a resumed
    run continues the per-step random draws where the interrupted one stopped."""
    if checkpoint is None or not Path(checkpoint).exists():
        return 0
    epochs = int(load_checkpoint(checkpoint, kind).get("train_state", {}).get("epoch", 0))
    return epochs * math.ceil(num_train / batch_size)


def step_dequantizer(leaf: str, levels: int, seed: int, first_step: int = 0) -> Callable[[Batch], Batch]:
    """``prepare`` for :func:`fit`: a global training batch of raw levels (first tensor) in model space,
    the noise of step ``t`` from a generator seeded by :func:`step_seed` — the same whatever the number
    of ranks, and the same after a resume (start at :func:`completed_steps`)."""
    step = [int(first_step)]

    def dequantize(batch: Batch) -> Batch:
        x = batch[0]
        gen = torch.Generator(device=x.device).manual_seed(step_seed(seed, step[0]))
        step[0] += 1
        return (to_model_space(x, leaf, levels, gen), *batch[1:])

    return dequantize


def dequantize_once(v: Tensor, leaf: str, levels: int, seed: int) -> Tensor:
    """Validation levels ``v`` in model space with fixed noise (seed ``seed + 1``): losses comparable across epochs."""
    return to_model_space(v, leaf, levels, torch.Generator().manual_seed(int(seed) + 1))


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
    """Refuse to resume from a checkpoint written for another model configuration."""
    old, new = (ck.get("meta") or {}).get("config"), (meta or {}).get("config")
    if old is not None and new is not None and old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise CheckpointError(f"{path} was written for another configuration (differs in {diff}); "
                              "delete it or re-run with --force to train from scratch")


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
        step = DistributedDataParallel(step, device_ids=[dev.index] if dev.type == "cuda" else None,
                                       find_unused_parameters=True)
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
) -> TrainResult:
    """Train ``model`` in place; at the end it holds the weights of the best validation epoch.

    ``loss_fn(model, batch)`` returns the mean loss of a batch (tensors already on
    ``cfg.device``). ``prepare`` (optional) maps each global training batch, on the device,
    before it is split over ranks (e.g. per-step dequantization noise, so the noise of a row is
    the same whatever P). ``checkpoint`` (optional) is written atomically after every
    epoch as a ``vq2pc/<kind>`` checkpoint holding ``meta`` as well, so
    ``load_checkpoint(path, kind)["state_dict"]`` is the best model.
    Under ``torchrun`` every rank calls ``fit`` (see the module docstring).
    """
    device = init_from_env(cfg.device)
    autocast, scaler = _autocast(cfg, device)
    model.to(device)
    opt = adam(model.parameters(), cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    state = {"epoch": 0, "best": math.inf, "bad": 0, "done": False, "history": [], "seconds": 0.0}
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if checkpoint is not None and Path(checkpoint).exists():
        ck = load_checkpoint(checkpoint, kind)
        if "train_state" in ck:
            _check_resumable(ck, checkpoint, meta)
            try:
                model.load_state_dict(ck["last_state_dict"])
                opt.load_state_dict(ck["optimizer"])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{checkpoint} does not fit this model ({str(exc).splitlines()[0]}); "
                                      "delete it or re-run with --force to train from scratch") from None
            gen.set_state(ck["rng"])
            state = ck["train_state"]
            best_state = ck["state_dict"]
            # "done" is judged by this call's budget: a larger `epochs` continues a finished run.
            state["done"] = state["bad"] >= cfg.patience or (
                cfg.max_seconds is not None and state["seconds"] > cfg.max_seconds)
    start = time.perf_counter() - state["seconds"]
    bar = tqdm(total=cfg.epochs, initial=state["epoch"], desc=desc, disable=not (cfg.progress and is_main()),
               leave=False)
    with global_batchnorm(model):
        step = _wrap(model, loss_fn, cfg, device)
        while not state["done"] and state["epoch"] < cfg.epochs:
            model.train()
            losses = []
            for batch in batches(train_data, cfg.batch_size, gen):
                b = tuple(t.to(device) for t in batch)
                local, weight, rows = _local(prepare(b) if prepare is not None else b)
                with autocast():
                    loss = step(*local)
                losses.append(_global_mean(loss, rows, b[0].shape[0]))
                if not math.isfinite(losses[-1]):
                    raise FloatingPointError(f"{desc}: loss became {losses[-1]} at epoch {state['epoch'] + 1}")
                opt.zero_grad(set_to_none=True)
                scaled = loss if weight == 1.0 else loss * weight
                if scaler is None:
                    scaled.backward()
                    opt.step()
                else:
                    scaler.scale(scaled).backward()
                    scaler.step(opt)
                    scaler.update()
            val = evaluate_loss(model, loss_fn, val_data, max(cfg.batch_size, 256), device)
            state["epoch"] += 1
            state["history"].append({"epoch": state["epoch"], "train": sum(losses) / len(losses), "val": val})
            if val < state["best"]:
                state["best"], state["bad"] = val, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                state["bad"] += 1
            state["seconds"] = time.perf_counter() - start
            out_of_time = _agree(cfg.max_seconds is not None and state["seconds"] > cfg.max_seconds, device)
            state["done"] = state["bad"] >= cfg.patience or state["epoch"] >= cfg.epochs or out_of_time
            bar.update(1)
            bar.set_postfix(train=f"{state['history'][-1]['train']:.4g}", val=f"{val:.4g}")
            if checkpoint is not None:
                save_checkpoint(checkpoint, kind, {
                    "meta": meta or {}, "state_dict": best_state, "last_state_dict": model.state_dict(),
                    "optimizer": opt.state_dict(), "rng": gen.get_state(), "train_state": state,
                    "train_config": asdict(cfg),
                })
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(
        best_val_loss=float(state["best"]), epochs_run=int(state["epoch"]),
        stopped_early=state["bad"] >= cfg.patience, seconds=float(state["seconds"]), history=list(state["history"]),
        time_capped=bool(cfg.max_seconds is not None and state["seconds"] > cfg.max_seconds
                         and state["bad"] < cfg.patience and state["epoch"] < cfg.epochs),
    )
