"""One trainer for every model vq2pc fits (VQ-VAE, prior, baselines, classifier).

Adam, a maximum number of epochs, early stopping on the validation loss, a
per-epoch atomic checkpoint (model, optimizer, best weights, RNG state) and
resume: calling :func:`fit` again with the same checkpoint path continues an
interrupted run where it stopped, and returns at once when it had finished.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from vq2pc.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

__all__ = ["TrainConfig", "TrainResult", "fit", "batches", "evaluate_loss"]

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

    def __post_init__(self) -> None:
        """Impossible settings fail here, when the config is built, not an epoch into training."""
        for name, low in (("epochs", 1), ("patience", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("lr", "max_seconds"):
            value = getattr(self, name)
            if (value is not None or name == "lr") and not (
                    isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf):
                raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass
class TrainResult:
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def batches(data: Sequence[Tensor], batch_size: int, generator: torch.Generator | None = None) -> list[Batch]:
    """Split tensors of equal first dimension into (shuffled if ``generator``) mini-batches."""
    n = data[0].shape[0]
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [tuple(t[order[i : i + batch_size]] for t in data) for i in range(0, n, batch_size)]


@torch.no_grad()
def evaluate_loss(model: nn.Module, loss_fn: LossFn, data: Sequence[Tensor], batch_size: int, device: str) -> float:
    """Mean of ``loss_fn`` over ``data`` (weighted by batch size), in eval mode."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches(data, batch_size):
        b = tuple(t.to(device) for t in batch)
        total += float(loss_fn(model, b)) * b[0].shape[0]
        count += b[0].shape[0]
    return total / max(count, 1)


def _check_resumable(ck: dict[str, Any], path: str | Path, meta: dict[str, Any] | None) -> None:
    """Refuse to resume from a checkpoint written for another model configuration."""
    old, new = (ck.get("meta") or {}).get("config"), (meta or {}).get("config")
    if old is not None and new is not None and old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise CheckpointError(f"{path} was written for another configuration (differs in {diff}); "
                              "delete it or re-run with --force to train from scratch")


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
) -> TrainResult:
    """Train ``model`` in place; at the end it holds the weights of the best validation epoch.

    ``loss_fn(model, batch)`` returns the mean loss of a batch (tensors already on
    ``cfg.device``). ``checkpoint`` (optional) is written atomically after every
    epoch as a ``vq2pc/<kind>`` checkpoint holding ``meta`` as well, so
    ``load_checkpoint(path, kind)["state_dict"]`` is the best model.
    """
    device = cfg.device
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
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
    bar = tqdm(total=cfg.epochs, initial=state["epoch"], desc=desc, disable=not cfg.progress, leave=False)
    while not state["done"] and state["epoch"] < cfg.epochs:
        model.train()
        losses = []
        for batch in batches(train_data, cfg.batch_size, gen):
            b = tuple(t.to(device) for t in batch)
            loss = loss_fn(model, b)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {float(loss)} at epoch {state['epoch'] + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        val = evaluate_loss(model, loss_fn, val_data, max(cfg.batch_size, 256), device)
        state["epoch"] += 1
        state["history"].append({"epoch": state["epoch"], "train": sum(losses) / len(losses), "val": val})
        if val < state["best"]:
            state["best"], state["bad"] = val, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state["bad"] += 1
        state["seconds"] = time.perf_counter() - start
        out_of_time = cfg.max_seconds is not None and state["seconds"] > cfg.max_seconds
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
    )
