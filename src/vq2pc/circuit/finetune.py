"""Fine-tuned distillation (beyond the paper): train the decoder on the mixture's own likelihood.

A VQ-VAE decoder is trained to reconstruct an image from *its own* code. In the distilled
circuit ``p̂(x) = Σ_n w_n p(x | z_n)`` it is one component of a mixture over *other* codes, and
its sharp stds (down to the 1e-3 floor) make a test image that no component covers cost
thousands of nats. Fine-tuning keeps the selected latents ``z_1..z_N`` fixed and maximizes

    Σ_x log Σ_n w_n p(x | decoder(z_n))

over the decoder's (and codebook's) parameters and, optionally, the mixture weights ``w``, on
the training split, early-stopped on the validation split's exact mixture log-likelihood. The
result is decoded again into a circuit: still an exact mixture over the same latents, decoded
by a VQ-VAE decoder. :func:`vq2pc.models.train.fit` trains it, so a fine-tuning run has what every
training has: an atomic per-epoch checkpoint, resume to the same numbers, DDP, early stopping.

Each step needs ``log p(x_b | z_n)`` with gradients only where it matters. Two ways to pick the
components that get gradients in a batch (``components``):

* ``"posterior"`` (default): the leaves of all N components are decoded without gradients at the
  start of every epoch and every ``refresh`` steps into it; each image's ``top_k`` components by (stale) posterior are decoded again
  with gradients, and the loss is ``−log Σ_{n∈U} w_n p(x | z_n)`` over their union ``U`` — a
  lower bound of the full mixture's log-likelihood, tight when the posterior is peaked (it is:
  784 pixels make one or two components carry nearly all of it);
* ``"random"``: a fresh uniform subset of ``subset`` components per step, weights renormalized
  over it — the way continuous mixtures train with random integration points.

An image that no component covers yet costs thousands of nats, and its gradient can be a thousand
times the median step's; ``clip`` bounds each step's global gradient norm so that such steps do not
wreck Adam's moments (on MNIST it is what lets small batches train stably, ``docs/NOTES.md``).

The likelihood-optimal Gaussian stds are wide, and samples of the fine-tuned mixture are speckled
(a classifier reads many as "8"). ``std_max`` caps every std smoothly below a value, in training and
in the circuit, so the components stay sharp: a trade of test BPD for sample quality (``docs/NOTES.md``).
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from vq2pc.circuit.distill import decode_leaf
from vq2pc.circuit.finetune_config import FineTuneConfig
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core.distributed import all_reduce_max_, all_reduce_sum, shard_range
from vq2pc.core.leaf_ops import cap_std, component_log_likelihoods
from vq2pc.core.leaves import Leaf, discretize
from vq2pc.core.random import step_seed
from vq2pc.data.datasets import DataSplits
from vq2pc.latents.selection import Selection
from vq2pc.models.train import TrainConfig, completed_steps, dequantize_once, fit, step_dequantizer

__all__ = [
    "FineTuneConfig",
    "FineTuneResult",
    "finetune",
    "finetune_distill",
    "PosteriorPicks",
    "subset_nll",
    "CAP_MARK",
    "cap_text",
]

CAP_MARK = " σ<"
"""Marks a row fine-tuned under ``std_max``: "DMRS+FT σ<0.125" (its file key: "…-ft-cap0.125")."""


def cap_text(std_max: float | None) -> str:
    """``std_max`` as row names and file keys write it ("0.125"); "" when there is no cap."""
    return "" if std_max is None else f"{std_max:g}"


@dataclass
class FineTuneResult:
    """The fine-tuned decoder (a copy), the mixture's ``log_weights [N]`` and the training record.

    With ``std_max`` the circuit's leaves are ``cap_std(decoder.decode(codes), std_max)``, not the raw decoder's.

    ``val_log_prob`` values are mean nats per validation image of the exact mixture."""

    decoder: nn.Module
    log_weights: Tensor
    start_val_log_prob: float
    best_val_log_prob: float
    best_epoch: int  # 0: no epoch beat the starting point, the decoder is the source's
    epochs_run: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def circuit_leaf(leaf: Leaf, cfg: FineTuneConfig) -> Leaf:
    """A decoded leaf as the circuit holds it: ``std_max``-capped, then discretized when ``cfg.discretized``."""
    leaf = cap_std(leaf, cfg.std_max)
    return leaf if cfg.discretized is None else discretize(leaf, cfg.discretized)


def _mean_log_prob(circuit: MixtureCircuit, x_val: Tensor) -> float:
    """Mean exact log p̂(x) over ``x_val [n, S]`` (each rank scores its :func:`shard_range` rows)."""
    lo, hi = shard_range(x_val.shape[0])
    return float(all_reduce_sum(circuit.log_prob(x_val[lo:hi]).double().sum())) / x_val.shape[0]


class PosteriorPicks:
    """``components: posterior``: the components that get gradients in a step. Each image's ``top_k`` components
    by posterior under a stale decode of the whole mixture (``decode()``, first at the first call, again at each
    :meth:`refresh`), united over the batch's rows and, under ``torchrun``, over every rank's rows (so every rank
    decodes the same components). The components may be codes of a VQ-VAE or points of a continuous mixture:
    only ``decode`` knows them."""

    def __init__(self, decode: Callable[[], MixtureCircuit], top_k: int) -> None:
        self.decode, self.top_k = decode, int(top_k)
        self.stale: MixtureCircuit | None = None

    def refresh(self) -> None:
        """Decode the whole mixture again (no gradients); later picks use it."""
        self.stale = self.decode()

    def __call__(self, x: Tensor) -> Tensor:
        """``x [B, S]`` (model space) -> the indices ``U`` (ascending, distinct) of the picked components."""
        if self.stale is None:
            self.refresh()
        return top_k_union(self.stale, x, self.top_k)


@torch.no_grad()
def top_k_union(circuit: MixtureCircuit, x: Tensor, top_k: int) -> Tensor:
    """The ascending indices ``U`` of the components among the ``top_k`` by posterior of any row of ``x [B, S]``,
    united over every rank's rows under ``torchrun``."""
    scores = circuit.log_likelihoods(x) + circuit.log_weights  # [B, N]
    chosen = torch.zeros(len(circuit), dtype=torch.int32, device=x.device)
    chosen[scores.topk(min(top_k, len(circuit)), dim=1).indices.flatten()] = 1
    return all_reduce_max_(chosen).nonzero().flatten()


def subset_nll(leaf: Leaf, x: Tensor, log_w: Tensor) -> Tensor:
    """``[B]`` ``−log Σ_{n∈U} w_n p(x_b | θ_n)`` (float64, differentiable) for ``x [B, S]``, the leaves of the
    components ``U`` (batch ``[|U|, S]``) and their log weights ``log_w [|U|]``: a lower bound of the mixture's
    log-likelihood, tight when the posterior mass of each image lies in ``U``."""
    return -torch.logsumexp(component_log_likelihoods(leaf, x).double() + log_w, dim=1)


class _Mixture(nn.Module):
    """What fine-tuning trains: a copy of the decoder, the selected ``codes [N,h,w]`` and the logits of the
    mixture weights ``[N]`` (a parameter with ``learn_weights``, else a buffer); :meth:`loss` is a step's loss.

    It stays in eval mode (batch norm keeps its statistics). :meth:`current` caches the mixture decoded
    without gradients until the next step changes the weights: the posterior picks of the first steps of
    an epoch use the decode that validated the epoch before."""

    def __init__(self, decoder: nn.Module, codes: Tensor, log_weights: Tensor, cfg: FineTuneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decoder = copy.deepcopy(decoder).eval()
        for p in self.decoder.parameters():
            p.requires_grad_(True)
        self.register_buffer("codes", codes.clone(), persistent=False)
        logits = log_weights.detach().double().clone()
        if cfg.learn_weights:
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)
        self.stale: MixtureCircuit | None = None  # the decode the posterior picks read
        self.fresh = False  # whether ``stale`` is the decode of the current weights
        self.step = 0

    def train(self, mode: bool = True) -> _Mixture:
        return super().train(False)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # a resume: the cached decode is of other weights
        self.fresh = False
        return super().load_state_dict(*args, **kwargs)

    def log_weights(self) -> Tensor:
        return torch.log_softmax(self.logits, 0)

    @torch.no_grad()
    def current(self) -> MixtureCircuit:
        """The mixture as decoded now (all N components, no gradients)."""
        if not self.fresh or self.stale is None:
            leaf = circuit_leaf(decode_leaf(self.decoder, self.codes), self.cfg)
            self.stale, self.fresh = MixtureCircuit(leaf, self.log_weights().detach()), True
        return self.stale

    def before_step(self, step: int, index: int) -> None:
        """:func:`~vq2pc.models.train.fit`'s hook: posterior picks re-decode every ``refresh`` steps of an epoch."""
        self.step = step
        if self.cfg.components == "posterior" and index % self.cfg.refresh == 0:
            self.current()

    def _pick(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Indices ``U`` of the components that get gradients for this rank's rows ``x``, and their log weights."""
        cfg, N = self.cfg, self.codes.shape[0]
        if cfg.components == "random":  # a stream apart from the step's dequantization noise
            gen = torch.Generator().manual_seed(step_seed(cfg.seed, self.step) + (1 << 48))
            U = torch.randperm(N, generator=gen)[: cfg.subset].to(self.codes.device)
            return U, torch.log_softmax(self.logits[U], 0)
        U = top_k_union(self.stale if self.stale is not None else self.current(), x, cfg.top_k)
        return U, self.log_weights()[U]

    def loss(self, x: Tensor) -> Tensor:
        """``−log Σ_{n∈U} w_n p(x | z_n)``, the mean over this rank's rows ``x [B_r, C, H, W]`` (model space)
        of the components :meth:`_pick` chose (nats per image)."""
        x = x.flatten(1)
        U, log_w = self._pick(x)
        self.fresh = False  # the step after this loss changes the weights
        leaf = circuit_leaf(self.decoder.decode(self.codes[U]), self.cfg)
        return subset_nll(leaf, x, log_w).mean()


_FIT_KEYS = ("epochs", "lr", "batch_size", "seed", "device", "progress", "schedule", "clip")
"""The settings of fine-tuning that :func:`~vq2pc.models.train.fit` takes as they are."""


def _train_config(cfg: FineTuneConfig) -> TrainConfig:
    """The :func:`~vq2pc.models.train.fit` settings of fine-tuning: ``patience`` epochs may fail to beat
    the best before the next failure stops training."""
    return TrainConfig(**{key: getattr(cfg, key) for key in _FIT_KEYS}, patience=cfg.patience + 1)


def _meta(cfg: FineTuneConfig, codes: Tensor, log_weights: Tensor) -> dict[str, Any]:
    """What a fine-tuning checkpoint is resumed for: the same settings, latents and starting weights."""
    digest = hashlib.sha256(codes.cpu().numpy().tobytes() + log_weights.double().cpu().numpy().tobytes())
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "device")}
    return {"config": {**settings, "selection_sha256": digest.hexdigest()}}


def finetune(
    decoder: nn.Module,
    codes: Tensor,
    log_weights: Tensor,
    splits: DataSplits,
    cfg: FineTuneConfig | None = None,
    checkpoint: str | Path | None = None,
) -> FineTuneResult:
    """Fine-tune a copy of ``decoder`` (``decode(codes [B,h,w]) -> Leaf [B,S]``) and the weights of the
    mixture over ``codes [N,h,w]`` (``log_weights [N]``) on ``splits``; keeps the best validation epoch.

    :func:`~vq2pc.models.train.fit` trains it: ``checkpoint`` (optional) is written after every epoch,
    and a call with the same path resumes an interrupted run (to the same numbers); under ``torchrun``
    every rank calls it, and the steps equal one process's. The source ``decoder`` is not modified.
    Deterministic for a given ``cfg.seed`` and device."""
    if codes.dim() != 3 or log_weights.shape != (codes.shape[0],) or codes.shape[0] == 0:
        raise ValueError(
            f"finetune needs codes [N,h,w] (N >= 1) and log_weights [N]; got "
            f"{tuple(codes.shape)} and {tuple(log_weights.shape)}"
        )
    cfg = (cfg or FineTuneConfig()).for_N(codes.shape[0])
    model = _Mixture(decoder, codes, log_weights, cfg).to(cfg.device)
    leaf_kind = model.current().leaf.data_kind
    train_v = splits.train_x[: cfg.train_limit] if cfg.train_limit else splits.train_x
    val_v = splits.val_x[: cfg.val_limit] if cfg.val_limit else splits.val_x
    x_val = dequantize_once(val_v, leaf_kind, splits.levels, cfg.seed).flatten(1).to(cfg.device)
    first = completed_steps(checkpoint, "finetune", len(train_v), cfg.batch_size)
    res = fit(
        model,
        lambda m, batch: m.loss(batch[0]),
        (train_v,),
        (),
        _train_config(cfg),
        checkpoint,
        kind="finetune",
        meta=_meta(cfg, codes, log_weights),
        desc="fine-tune",
        prepare=step_dequantizer(leaf_kind, splits.levels, cfg.seed, first),
        validate=lambda m: -_mean_log_prob(m.current(), x_val),
        before_step=model.before_step,
        score_start=True,
    )
    history = [
        {"epoch": h["epoch"], "train_loss": h["train"], "val_log_prob": -h["val"], "lr": h["lr"]} for h in res.history
    ]
    return FineTuneResult(
        decoder=model.decoder.eval() if res.best_epoch else decoder,
        log_weights=model.log_weights().detach().to(log_weights.dtype).cpu(),
        start_val_log_prob=-float(res.start_val_loss),
        best_val_log_prob=-res.best_val_loss,
        best_epoch=res.best_epoch,
        epochs_run=res.epochs_run,
        seconds=res.seconds,
        history=history,
    )


def finetune_distill(
    decoder: nn.Module,
    selection: Selection,
    splits: DataSplits,
    cfg: FineTuneConfig | None = None,
    weights: str = "uniform",
    meta: dict[str, Any] | None = None,
    checkpoint: str | Path | None = None,
) -> tuple[MixtureCircuit, FineTuneResult]:
    """:func:`finetune` the mixture of ``selection`` (initial ``weights``: uniform | prior; resumable from
    ``checkpoint``) and decode it into a :class:`MixtureCircuit` whose meta records the fine-tuning."""
    cfg = (cfg or FineTuneConfig()).for_N(len(selection.codes))
    res = finetune(decoder, selection.codes, selection.log_weights(weights), splits, cfg, checkpoint)
    info = {
        "strategy": selection.strategy,
        "weights": "finetuned" if cfg.learn_weights else weights,
        "finetune": {
            "best_epoch": res.best_epoch,
            "epochs_run": res.epochs_run,
            "seconds": round(res.seconds, 3),
            "start_val_log_prob": res.start_val_log_prob,
            "best_val_log_prob": res.best_val_log_prob,
            "components": cfg.components,
            "lr": cfg.lr,
            "schedule": cfg.schedule,
            **({"refresh": cfg.refresh} if cfg.components == "posterior" else {}),
            **({"std_max": cfg.std_max} if cfg.std_max is not None else {}),
            **({"discretized": cfg.discretized} if cfg.discretized is not None else {}),
        },
        **(meta or {}),
    }
    leaf = circuit_leaf(decode_leaf(res.decoder, selection.codes), cfg)
    return MixtureCircuit(leaf, res.log_weights.to(leaf.device), meta=info), res
