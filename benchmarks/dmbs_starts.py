"""DMBS versus DMRS after fine-tuning, as a function of the beam's starting tokens per class ``s``.

Beam search keeps the highest-p(z) completions of each of its ``s·C`` sampled start tokens, so its
N latents share long prefixes and their components are redundant; more starts (narrower beams,
width ``N / (s·C)``) spread them. This measures the lever on the *validation* split (test data is
not used): for each ``s``, DMBS with N latents, fine-tuned (``vq2pc.circuit.finetune``), against DMRS
(and, with ``--gumbel``, the stochastic beam search DMGS) with the same N and the same fine-tuning. Validation BPD before and after fine-tuning; one JSON
line per selection.

    python benchmarks/dmbs_starts.py --run runs/mnist-ft --data-dir DIR --N 1024 --starts 10 40 102
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vq2pc.circuit.finetune import FineTuneConfig, finetune_distill
from vq2pc.data.datasets import bpd, load_dataset
from vq2pc.latents.selection import select
from vq2pc.models.priors import load_prior
from vq2pc.models.vqvae import VQVAE


def _val_bpd(nats_per_image: float, S: int, levels: int) -> float:
    """Validation BPD of a mean log-likelihood (nats per image in model space, Gaussian pixels)."""
    return float(bpd(torch.tensor([nats_per_image], dtype=torch.float64), S, levels, "gaussian"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run directory with gaussian/<model>/{vqvae,prior}.pt")
    ap.add_argument("--model", default="4x4", help="source model name in the run directory")
    ap.add_argument("--data-dir", required=True, help="directory with the MNIST IDX files")
    ap.add_argument("--N", type=int, default=1024, help="components")
    ap.add_argument(
        "--starts", type=int, nargs="*", default=[10, 40, 102], help="DMBS start tokens per class (none: no DMBS)"
    )
    ap.add_argument("--gumbel", action="store_true", help="also the stochastic beam search (DMGS, Kool et al.)")
    ap.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs")
    ap.add_argument("--train-limit", type=int, default=20000, help="training images used by fine-tuning")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    splits = load_dataset("mnist", args.data_dir, seed=args.seed, download=False)
    vqvae = VQVAE.load(f"{args.run}/gaussian/{args.model}/vqvae.pt")
    prior = load_prior(f"{args.run}/gaussian/{args.model}/prior.pt")
    cfg = FineTuneConfig(
        epochs=args.epochs,
        patience=1,
        lr=1e-3,
        schedule="constant",
        batch_size=128,
        top_k=1,
        refresh=25,
        train_limit=args.train_limit,
        seed=args.seed,
        progress=False,
    )
    S = splits.num_variables
    runs = [("sample", None)] + [("gumbel", None)] * args.gumbel + [("beam", s) for s in args.starts]
    for strategy, s in runs:
        start = time.perf_counter()
        sel = select(prior, strategy, args.N, starts=s or 10, generator=torch.Generator().manual_seed(args.seed))
        select_s = time.perf_counter() - start
        _, res = finetune_distill(vqvae, sel, splits, cfg)
        distinct_first = len(torch.unique(sel.codes.flatten(1)[:, 0]))
        shared = (sel.codes.flatten(1)[:, None, :] == sel.codes.flatten(1)[None, :, :]).float().mean().item()
        print(
            json.dumps(
                {
                    "selection": {"sample": "DMRS", "gumbel": "DMGS", "beam": "DMBS"}[strategy],
                    "starts": s,
                    "N": len(sel),
                    "val_bpd_paper_faithful": round(_val_bpd(res.start_val_log_prob, S, splits.levels), 4),
                    "val_bpd_finetuned": round(_val_bpd(res.best_val_log_prob, S, splits.levels), 4),
                    "distinct_first_codes": distinct_first,
                    "mean_shared_positions": round(shared * sel.codes[0].numel(), 2),
                    "select_seconds": round(select_s, 1),
                    "finetune_seconds": round(res.seconds, 1),
                    "finetune_epochs": res.epochs_run,
                    "train_images": args.train_limit,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
