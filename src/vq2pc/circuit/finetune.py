"""Fine-tuned distillation (beyond the paper): train the decoder on the mixture's own likelihood.

A VQ-VAE decoder is trained to reconstruct an image from *its own* code. In the distilled
circuit ``p̂(x) = Σ_n w_n p(x | z_n)`` it is one component of a mixture over *other* codes, and
its sharp stds (down to the 1e-3 floor) make a test image that no component covers cost
thousands of nats. Fine-tuning keeps the selected latents ``z_1..z_N`` fixed and maximizes

    Σ_x log Σ_n w_n p(x | decoder(z_n))

over the decoder's (and codebook's) parameters and, optionally, the mixture weights ``w``, on
the training split, early-stopped on the validation split's exact mixture log-likelihood. The
result is decoded again into a circuit: still an exact mixture over the same latents, decoded
by a VQ-VAE decoder.

Each step needs ``log p(x_b | z_n)`` with gradients only where it matters. Two ways to pick the
components that get gradients in a batch (``components``):

* ``"posterior"`` (default): the leaves of all N components are decoded without gradients every
  ``refresh`` steps; each image's ``top_k`` components by (stale) posterior are decoded again
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
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from vq2pc.circuit.distill import decode_leaf
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core.distributed import all_reduce_max_, all_reduce_sum, is_distributed, is_main, shard_range
from vq2pc.core.leaves import cap_std, component_log_likelihoods
from vq2pc.core.optim import adam
from vq2pc.core.random import step_seed
from vq2pc.core.validate import is_positive_number
from vq2pc.data.datasets import DataSplits, to_model_space
from vq2pc.latents.selection import Selection

__all__ = ["FineTuneConfig", "FineTuneResult", "finetune", "finetune_distill", "CAP_MARK", "cap_text"]

COMPONENT_MODES = ("posterior", "random")
SCHEDULES = ("constant", "cosine")
CAP_MARK = " σ<"
"""Marks a row fine-tuned under ``std_max``: "DMRS+FT σ<0.125" (its file key: "…-ft-cap0.125")."""


def cap_text(std_max: float | None) -> str:
    """``std_max`` as row names and file keys write it ("0.125"); "" when there is no cap."""
    return "" if std_max is None else f"{std_max:g}"


@dataclass
class FineTuneConfig:
    """Settings of :func:`finetune` (see the module docstring for ``components``).

    The defaults are the recipe of the MNIST configs (``configs/mnist-ft-2h-cpu.yaml``, docs/NOTES.md):
    each image's top-1 component gets gradients, Adam at 1e-3 decaying (cosine) to 0 over 12 epochs,
    the best validation epoch kept. Those configs also clip gradients (``clip: 300``, Gaussian MNIST
    pixels) and refresh less often above N = 4096 (``refresh_N``); both stay off by default."""

    epochs: int = 12
    patience: int = 12  # epochs without a better validation likelihood before stopping (= epochs: the cosine
    #   rate's last epochs often win back a dip)
    lr: float = 1e-3
    schedule: str = "cosine"  # constant | cosine (the learning rate decays to 0 over ``epochs`` epochs, per step)
    batch_size: int = 64
    components: str = "posterior"  # posterior | random
    top_k: int = 1  # posterior: components per image that get gradients
    refresh: int = 100  # posterior: steps between re-decodes of all N components (to pick the top-k)
    refresh_N: int | None = None  # above this N the interval grows ∝ N (refresh·N/refresh_N steps): the same
    #   re-decode cost per step as at refresh_N; None: `refresh` at every N (docs/NOTES.md, "Refreshing the picks")
    subset: int = 256  # random: components per step
    clip: float | None = None  # max global gradient norm per step (None: no clipping)
    learn_weights: bool = True  # train the mixture weights jointly (else keep the selection's)
    std_max: float | None = None  # Gaussian leaves: cap every std smoothly below this (core.leaves.cap_std), in
    #   training and in the circuit: sharper components and class-balanced samples at a cost in BPD (docs/NOTES.md)
    train_limit: int | None = None  # first images of the training split used (None: all)
    val_limit: int | None = None  # first images of the validation split used for early stopping
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.components not in COMPONENT_MODES:
            raise ValueError(f"fine-tuning components must be one of {list(COMPONENT_MODES)}, got {self.components!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"fine-tuning schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        ints = {"epochs": self.epochs, "batch_size": self.batch_size, "top_k": self.top_k,
                "refresh": self.refresh, "subset": self.subset}
        if self.refresh_N is not None:
            ints["refresh_N"] = self.refresh_N
        bad = {k: v for k, v in ints.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
        if bad or not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"fine-tuning needs positive integers for {sorted(ints)} and patience >= 0; got {bad or self.patience}")
        if not is_positive_number(self.lr):
            raise ValueError(f"fine-tuning lr must be a positive number, got {self.lr!r}")
        for name in ("clip", "std_max"):
            if getattr(self, name) is not None and not is_positive_number(getattr(self, name)):
                raise ValueError(f"fine-tuning {name} must be a positive number or None, got {getattr(self, name)!r}")

    def for_N(self, N: int) -> "FineTuneConfig":
        """These settings for a mixture of ``N`` components: ``refresh_N`` resolved into ``refresh``."""
        if self.refresh_N is None or N <= self.refresh_N:
            return replace(self, refresh_N=None)
        return replace(self, refresh=math.ceil(self.refresh * N / self.refresh_N), refresh_N=None)


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


def _mean_log_prob(circuit: MixtureCircuit, x_val: Tensor) -> float:
    """Mean exact log p̂(x) over ``x_val [n, S]`` (each rank scores its :func:`shard_range` rows)."""
    lo, hi = shard_range(x_val.shape[0])
    return float(all_reduce_sum(circuit.log_prob(x_val[lo:hi]).double().sum())) / x_val.shape[0]


class _Trainer:
    """One fine-tuning run: state shared by the steps (decoder copy, weights, optimizer, stale leaves)."""

    def __init__(self, decoder: nn.Module, codes: Tensor, log_weights: Tensor, cfg: FineTuneConfig,
                 total_steps: int) -> None:
        self.cfg, self.codes = cfg, codes.to(cfg.device)
        self.decoder = copy.deepcopy(decoder).to(cfg.device).eval()  # eval: batch norm keeps its statistics
        for p in self.decoder.parameters():
            p.requires_grad_(True)
        self.logits = nn.Parameter(log_weights.detach().double().to(cfg.device).clone(),
                                   requires_grad=cfg.learn_weights)
        self.params = list(self.decoder.parameters()) + ([self.logits] if cfg.learn_weights else [])
        self.opt = adam(self.params, cfg.lr)
        self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=total_steps)
                      if cfg.schedule == "cosine" else None)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.stale: MixtureCircuit | None = None
        self.step_count = 0

    def log_weights(self) -> Tensor:
        return torch.log_softmax(self.logits, 0)

    def decoded(self) -> MixtureCircuit:
        """The mixture as decoded now (all N components, no gradients)."""
        return MixtureCircuit(cap_std(decode_leaf(self.decoder, self.codes), self.cfg.std_max),
                              self.log_weights().detach())

    def _pick(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Indices ``U`` of the components that get gradients for batch ``x``, and their log weights."""
        cfg, N = self.cfg, self.codes.shape[0]
        if cfg.components == "random":
            U = torch.randperm(N, generator=self.gen)[: cfg.subset].to(self.codes.device)
            return U, torch.log_softmax(self.logits[U], 0)
        if self.stale is None or self.step_count % cfg.refresh == 0:
            self.stale = self.decoded()
        with torch.no_grad():
            scores = self.stale.log_likelihoods(x) + self.stale.log_weights  # [B_r, N]
            chosen = torch.zeros(N, dtype=torch.int32, device=x.device)
            chosen[scores.topk(min(cfg.top_k, N), dim=1).indices.flatten()] = 1
            U = all_reduce_max_(chosen).nonzero().flatten()  # the union over every rank's images
        return U, self.log_weights()[U]

    def step(self, v: Tensor, levels: int, leaf_kind: str) -> float:
        """One Adam step on a global batch of raw levels ``v [B, C, H, W]``; returns its loss (nats/image).

        Under ``torchrun`` each rank scores its :func:`shard_range` rows against the components that
        any rank's images picked, and the gradients of the summed loss are all-reduced: the step equals
        one process's on the same batch (the dequantization noise is drawn for the global batch)."""
        gen = torch.Generator().manual_seed(step_seed(self.cfg.seed, self.step_count))
        x = to_model_space(v, leaf_kind, levels, gen).flatten(1).to(self.cfg.device)
        lo, hi = shard_range(x.shape[0])
        U, log_w = self._pick(x[lo:hi])
        leaf = cap_std(self.decoder.decode(self.codes[U]), self.cfg.std_max)
        lp = component_log_likelihoods(leaf, x[lo:hi])  # [B_r, |U|]
        loss = -torch.logsumexp(lp.double() + log_w, dim=1).sum() / x.shape[0]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if is_distributed():
            for p in self.params:
                if p.grad is not None:  # the same parameters have gradients on every rank (same U)
                    dist.all_reduce(p.grad)
        if self.cfg.clip is not None:
            nn.utils.clip_grad_norm_(self.params, self.cfg.clip)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.step_count += 1
        return float(all_reduce_sum(loss.detach()))


def finetune(decoder: nn.Module, codes: Tensor, log_weights: Tensor, splits: DataSplits,
             cfg: FineTuneConfig | None = None) -> FineTuneResult:
    """Fine-tune a copy of ``decoder`` (``decode(codes [B,h,w]) -> Leaf [B,S]``) and the weights of the
    mixture over ``codes [N,h,w]`` (``log_weights [N]``) on ``splits``; keeps the best validation epoch.

    The source ``decoder`` is not modified. Deterministic for a given ``cfg.seed`` and device."""
    if codes.dim() != 3 or log_weights.shape != (codes.shape[0],) or codes.shape[0] == 0:
        raise ValueError(f"finetune needs codes [N,h,w] (N >= 1) and log_weights [N]; got "
                         f"{tuple(codes.shape)} and {tuple(log_weights.shape)}")
    cfg = (cfg or FineTuneConfig()).for_N(codes.shape[0])
    start = time.perf_counter()
    train_v = splits.train_x[: cfg.train_limit] if cfg.train_limit else splits.train_x
    trainer = _Trainer(decoder, codes, log_weights, cfg, cfg.epochs * math.ceil(len(train_v) / cfg.batch_size))
    trainer.stale = start_circuit = trainer.decoded()  # also the components' scores of the first steps
    leaf_kind = start_circuit.leaf.kind
    val_v = splits.val_x[: cfg.val_limit] if cfg.val_limit else splits.val_x
    x_val = to_model_space(val_v, leaf_kind, splits.levels, torch.Generator().manual_seed(cfg.seed + 1))
    x_val = x_val.flatten(1).to(cfg.device)
    best = _mean_log_prob(start_circuit, x_val)
    result = FineTuneResult(decoder, trainer.log_weights().detach().to(log_weights.dtype).cpu(), best, best, 0, 0, 0.0)
    best_state = (copy.deepcopy(trainer.decoder.state_dict()), trainer.logits.detach().clone())
    bar = tqdm(range(1, cfg.epochs + 1), desc="fine-tune", disable=not (cfg.progress and is_main()), leave=False)
    for epoch in bar:
        order = torch.randperm(len(train_v), generator=torch.Generator().manual_seed(cfg.seed + 7919 * epoch))
        losses = [trainer.step(train_v[order[i: i + cfg.batch_size]], splits.levels, leaf_kind)
                  for i in range(0, len(train_v), cfg.batch_size)]
        val = _mean_log_prob(trainer.decoded(), x_val)
        result.history.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), "val_log_prob": val,
                               "lr": trainer.opt.param_groups[0]["lr"]})
        result.epochs_run = epoch
        bar.set_postfix(val=f"{val:.1f}")
        if val > result.best_val_log_prob:
            result.best_val_log_prob, result.best_epoch = val, epoch
            best_state = (copy.deepcopy(trainer.decoder.state_dict()), trainer.logits.detach().clone())
        elif epoch - result.best_epoch > cfg.patience:
            break
    if result.best_epoch > 0:
        trainer.decoder.load_state_dict(best_state[0])
        result.decoder = trainer.decoder.eval()
        result.log_weights = torch.log_softmax(best_state[1], 0).to(log_weights.dtype).cpu()
    result.seconds = time.perf_counter() - start
    return result


def finetune_distill(decoder: nn.Module, selection: Selection, splits: DataSplits, cfg: FineTuneConfig | None = None,
                     weights: str = "uniform", meta: dict[str, Any] | None = None) -> tuple[MixtureCircuit, FineTuneResult]:
    """:func:`finetune` the mixture of ``selection`` (initial ``weights``: uniform | prior) and decode it
    into a :class:`MixtureCircuit` whose meta records the fine-tuning."""
    cfg = (cfg or FineTuneConfig()).for_N(len(selection.codes))
    res = finetune(decoder, selection.codes, selection.log_weights(weights), splits, cfg)
    info = {"strategy": selection.strategy, "weights": "finetuned" if cfg.learn_weights else weights,
            "finetune": {"best_epoch": res.best_epoch, "epochs_run": res.epochs_run, "seconds": round(res.seconds, 3),
                         "start_val_log_prob": res.start_val_log_prob, "best_val_log_prob": res.best_val_log_prob,
                         "components": cfg.components, "lr": cfg.lr, "schedule": cfg.schedule,
                         **({"refresh": cfg.refresh} if cfg.components == "posterior" else {}),
                         **({"std_max": cfg.std_max} if cfg.std_max is not None else {})},
            **(meta or {})}
    leaf = cap_std(decode_leaf(res.decoder, selection.codes), cfg.std_max)
    return MixtureCircuit(leaf, res.log_weights.to(leaf.device), meta=info), res
