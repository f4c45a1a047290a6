"""Class-conditional causal Transformer prior p(z | c) over the row-major sequence of VQ-VAE codes.

The prior most VQ pipelines use (VQ-GAN, Esser et al. 2021, "Taming Transformers for
High-Resolution Image Synthesis", arXiv:2012.09841; the decoder-only Transformer of Radford et
al. 2019, GPT-2, with pre-LN blocks). The input sequence of length ``P = H·W`` is the class token
followed by the codes ``z_0 .. z_{P-2}`` (row-major, ``i = r·W + col``), each plus a learned
position embedding; causal self-attention makes output ``i`` a function of the class and
``z_<i`` only, and a linear head gives the logits of ``z_i``. ``C = 1`` is the unlabeled mode
(the class token is then a learned start token).

Incremental decoding (:meth:`TransformerPrior.start` / :meth:`~TransformerPrior.step` /
:meth:`~TransformerPrior.reorder`) keeps every layer's keys and values of the tokens seen so far
in a cache ``[rows, heads, P, d/heads]`` (``rows`` = sequences × classes), so one step feeds one
new token per row — O(1) new tokens, whatever the prefix length — and a beam search reorders the
cache rows instead of recomputing prefixes. Memory of a state: ``2 · layers · rows · P · d`` floats.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import Tensor, nn

from vq2pc.core.settings import AsTuple, Count, settings
from vq2pc.models.priors.base import AutoregressivePrior, fit_prior
from vq2pc.models.train import TrainConfig, TrainResult

__all__ = ["TransformerPriorConfig", "TransformerPrior", "train_transformer_prior"]


@settings
class TransformerPriorConfig:
    """``K`` codes on a ``latent_hw`` grid, ``num_classes`` classes; width ``d_model``, ``layers`` blocks of ``heads`` heads."""

    K: Count
    latent_hw: Annotated[tuple[Count, Count], AsTuple]
    num_classes: Count = 1
    d_model: Count = 64
    layers: Count = 2
    heads: Count = 4

    @model_validator(mode="after")
    def _agree(self) -> TransformerPriorConfig:
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of heads={self.heads}")
        return self


KV = tuple[Tensor, Tensor]  # one layer's key and value cache, each [rows, heads, P, d/heads]


class _Block(nn.Module):
    """Pre-LN Transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor, cache: KV | None = None, t0: int = 0) -> Tensor:
        """``x [rows, T, d]`` at positions ``t0 .. t0+T-1``. Without ``cache``: a whole sequence (``t0 = 0``),
        causal. With ``cache``: keys/values are written at ``t0..`` and the queries attend to positions ``≤`` their own."""
        rows, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(rows, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            keys, values = cache
            keys[:, :, t0 : t0 + T], values[:, :, t0 : t0 + T] = k, v
            mask = torch.ones((T, t0 + T), dtype=torch.bool, device=x.device).tril(diagonal=t0)
            a = F.scaled_dot_product_attention(q, keys[:, :, : t0 + T], values[:, :, : t0 + T], attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(rows, T, d))
        return x + self.mlp(self.ln2(x))


@dataclass
class _CacheState:
    """Transformer decoding state: per-layer caches over ``rows = B·M`` (sequence-major), classes ``[B, M]``,
    and ``t``, the position whose log-probabilities were returned last."""

    caches: list[KV]
    classes: Tensor
    t: int


class TransformerPrior(AutoregressivePrior, nn.Module):
    """Class-conditional causal Transformer over ``[B, h, w]`` code grids (see module docstring)."""

    checkpoint_kind = "transformer-prior"
    config_class = TransformerPriorConfig

    def __init__(self, cfg: TransformerPriorConfig) -> None:
        super().__init__()
        P, d = cfg.latent_hw[0] * cfg.latent_hw[1], cfg.d_model
        self.embed = nn.Embedding(cfg.K, d)
        self.class_embed = nn.Embedding(cfg.num_classes, d)
        self.pos = nn.Parameter(torch.zeros(P, d))
        self.blocks = nn.ModuleList(_Block(d, cfg.heads) for _ in range(cfg.layers))
        self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, cfg.K)
        for table in (self.embed.weight, self.class_embed.weight, self.pos):
            nn.init.normal_(table, std=0.02)
        self._init_prior(cfg)

    # ------------------------------------------------------------------ whole sequences
    def embed_codes(self, z: Tensor) -> Tensor:
        """Codes ``[B,h,w]`` -> code embeddings ``[B,P,d]`` (the differentiable input)."""
        return self.embed(z.flatten(1))

    def logits_from_embedding(self, e: Tensor, c: Tensor) -> Tensor:
        """Code embeddings ``[B,P,d]`` and classes ``[B]`` -> logits ``[B,P,K]`` of p(z_i | z_<i, c)."""
        x = torch.cat([self.class_embed(c)[:, None], e[:, :-1]], 1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def logits(self, z: Tensor, c: Tensor) -> Tensor:
        """Codes ``[B,h,w]``, classes ``[B]`` -> logits ``[B,K,h,w]`` of p(z_i | z_<i, c) (no log-softmax)."""
        z = self.check_codes(z)
        c = self.check_classes(c, z.shape[0]).to(z.device)
        return (
            self.logits_from_embedding(self.embed_codes(z), c)
            .transpose(1, 2)
            .reshape(z.shape[0], self.K, *self.latent_hw)
        )

    def log_prob_given_class(self, z: Tensor, c: Tensor) -> Tensor:
        """``[B]`` log p(z | c) for codes ``[B,h,w]`` and classes ``[B]`` (one pass over the whole sequence)."""
        logp = F.log_softmax(self.logits(z, c), dim=1)
        return logp.gather(1, z.long()[:, None]).flatten(1).sum(1)

    # ------------------------------------------------------------------ incremental decoding
    def _forward_cached(self, x: Tensor, caches: list[KV], t0: int) -> Tensor:
        """New tokens ``x [rows, T, d]`` at positions ``t0..`` -> ``[rows, K]`` log-probs of the last one."""
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache, t0)
        return F.log_softmax(self.head(self.ln_f(x[:, -1])), dim=-1)

    def start(
        self, classes: Tensor, prefix: Tensor | None = None, batch_size: int = 8192
    ) -> tuple[_CacheState, Tensor]:
        """Fill the caches with the class token and ``prefix [B, t]`` for every class of ``classes [B, M]``;
        returns the state and ``[B, M, K]`` log-probs at ``t``. (Rows are not chunked: ``batch_size`` is unused.)"""
        classes, prefix = self.check_start(classes, prefix)
        (B, M), t = classes.shape, prefix.shape[1]
        heads, d = self.cfg.heads, self.cfg.d_model
        shape = (B * M, heads, self.num_positions, d // heads)
        caches = [(self.pos.new_zeros(shape), self.pos.new_zeros(shape)) for _ in self.blocks]
        tokens = (
            torch.cat([self.class_embed(classes.reshape(-1))[:, None], self.embed(prefix).repeat_interleave(M, 0)], 1)
            + self.pos[: t + 1]
        )
        logp = self._forward_cached(tokens, caches, 0)
        return _CacheState(caches, classes, t), logp.view(B, M, self.K)

    def step(self, state: _CacheState, tokens: Tensor) -> tuple[_CacheState, Tensor | None]:
        """Feed ``tokens [B]`` (the codes at position ``t``) as one new input per row; ``[B, M, K]`` log-probs
        at ``t + 1``, or None when ``t`` was the last position (nothing is computed then)."""
        B, M = state.classes.shape
        state.t += 1
        if state.t == self.num_positions:
            return state, None
        x = (self.embed(tokens.to(self.device).long()) + self.pos[state.t]).repeat_interleave(M, 0)[:, None]
        logp = self._forward_cached(x, state.caches, state.t)
        return state, logp.view(B, M, self.K)

    def reorder(self, state: _CacheState, index: Tensor) -> _CacheState:
        """The sequences ``index [B']`` of ``state``: their cache rows are gathered (a new state)."""
        M = state.classes.shape[1]
        index = index.to(self.device).long()
        rows = (index[:, None] * M + torch.arange(M, device=self.device)).reshape(-1)
        caches = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in state.caches]
        return _CacheState(caches, state.classes[index], state.t)


def train_transformer_prior(
    codes: Tensor,
    labels: Tensor | None,
    cfg: TransformerPriorConfig,
    train_cfg: TrainConfig,
    val_codes: Tensor,
    val_labels: Tensor | None,
    checkpoint: str | Path | None = None,
) -> tuple[TransformerPrior, TrainResult]:
    """Fit the Transformer on codes ``[n,h,w]`` (labels ``[n]`` or None), see :func:`~vq2pc.models.priors.base.fit_prior`."""
    return fit_prior(TransformerPrior, codes, labels, cfg, train_cfg, val_codes, val_labels, checkpoint)
