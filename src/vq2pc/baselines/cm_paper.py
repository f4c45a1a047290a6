"""Training loss of the continuous mixture's paper recipe (``CMConfig(recipe="paper")``), for :func:`train.fit`.

The model is a finite mixture: ``p(x) = (1/M) Σ_m p(x | decoder(z_m))`` over its fixed grid
``z_1..z_M`` (``ContinuousMixture.grid``). A training step is fine-tuned distillation's
``components: posterior`` step (:mod:`vq2pc.circuit.finetune`) with the grid points as the
components and uniform, fixed weights:

* every ``refresh`` steps the whole grid is decoded without gradients (:class:`PosteriorPicks`);
  each image's ``top_k`` points by that (stale) posterior are picked, and their union ``U`` over
  the batch is decoded again with gradients;
* the loss is ``−log Σ_{m∈U} (1/M) p(x | z_m)`` per image (:func:`subset_nll`), in nats per
  dimension: a lower bound of the log-likelihood that is tight when one point carries an image's
  posterior, as it does on 784 pixels.

The paper's code scores a fresh randomized lattice of 2^14 points at every step; a fixed grid makes the
trained model the compiled one, and lets the grid's decode be reused for ``refresh`` steps (the
posterior's argmax moves slowly). The refresh count restarts each epoch, so a resumed run (which starts
at an epoch boundary with no stale decode) picks exactly what the uninterrupted run picked.

Validation (eval mode) is the exact mixture's negative log-likelihood per dimension, with the grid
decoded once per validation pass.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vq2pc.circuit.distill import decode_leaf
from vq2pc.circuit.finetune import PosteriorPicks, subset_nll
from vq2pc.circuit.mixture import MixtureCircuit

if TYPE_CHECKING:
    from vq2pc.baselines.cm import ContinuousMixture

__all__ = ["GridLoss"]


class GridLoss:
    """``loss(model, batch)`` for :func:`vq2pc.models.train.fit`: batch ``(x [B, C, H, W],)`` in model space.

    ``first_step``: training steps already run (a resumed run's :func:`completed_steps`);
    ``steps_per_epoch``: ``ceil(n_train / batch_size)``, where the refresh count restarts."""

    def __init__(self, model: ContinuousMixture, first_step: int, steps_per_epoch: int) -> None:
        self.model, self.step, self.per_epoch = model, int(first_step), int(steps_per_epoch)
        self.refresh = model.cfg.refresh
        self.decoded_at: int | None = None  # the step whose parameters `current` was decoded with
        self.current: MixtureCircuit | None = None
        self.picks = PosteriorPicks(self.decoded, model.cfg.top_k)

    def log_weights(self) -> Tensor:
        """``[M]`` the grid's uniform log weights (float64, on the grid's device)."""
        M = self.model.grid.shape[0]
        return torch.full((M,), -math.log(M), dtype=torch.float64, device=self.model.grid.device)

    def decoded(self) -> MixtureCircuit:
        """The mixture with the current parameters (decoded once per step at most, no gradients)."""
        if self.decoded_at != self.step or self.current is None:
            mode = self.model.training
            self.current = MixtureCircuit(decode_leaf(self.model, self.model.grid), self.log_weights())
            self.model.train(mode)  # decode_leaf leaves the model in eval mode
            self.decoded_at = self.step
        return self.current

    def __call__(self, model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        """Mean NLL per dimension of the batch: exact in eval mode, the top-k bound in training."""
        x = batch[0].flatten(1)
        if not model.training:
            return -self.decoded().log_prob(x).mean() / x.shape[1]
        if (self.step % self.per_epoch) % self.refresh == 0:
            self.picks.refresh()
        U = self.picks(x)
        loss = subset_nll(model.decode(model.grid[U]), x, self.log_weights()[U]).mean() / x.shape[1]
        self.step += 1
        return loss.float()
