"""Lossless compression of MNIST test images: distilled circuits against PNG, WebP, JPEG XL, gzip and xz.

For each circuit: the file's bits per pixel (whole file, and code words alone) beside the circuit's
own test BPD on the same images, and encode/decode throughput; once for the images: the standard
codecs (``vq2pc.evaluate.compression``). Prints one JSON object and writes it to ``--out``.

    python benchmarks/mnist_compression.py RUN/circuits/a.safetensors [B.safetensors ...] \\
        --data-dir DATA --limit 1000 --threads 2 --out report.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from vq2pc import Categorical, MixtureCircuit, load_dataset
from vq2pc.circuit.codec import dataset_images
from vq2pc.circuit.refine import EMConfig, em_refine
from vq2pc.core.files import write_json
from vq2pc.evaluate.compression import circuit_compression, standard_codecs


def em_mixture(train: torch.Tensor, n: int, seed: int = 0) -> MixtureCircuit:
    """A categorical mixture fit by EM, for comparison (no VQ-VAE): components start as ``n`` random training
    images with a discretized Gaussian of 24 levels around each pixel value, then 4 EM iterations on the
    first 20k training images (leaves and weights, smoothing 0.1)."""
    g = torch.Generator().manual_seed(seed)
    x = train.reshape(train.shape[0], -1).long()
    centres = x[torch.randperm(x.shape[0], generator=g)[:n]].float()  # [n, S]
    logits = -((torch.arange(256.0)[None, None, :] - centres[:, :, None]) ** 2) / (2 * 24.0**2)  # [n, S, L]
    meta = {"image_shape": list(train.shape[1:]), "levels": 256}
    c = MixtureCircuit(Categorical(logits), torch.zeros(n), meta=meta)
    cfg = EMConfig(iterations=4, leaves=True, smoothing=0.1, batch_size=2048)
    return em_refine(c, x[:20000].float(), cfg)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("circuits", nargs="*", help="circuit files (.safetensors), categorical or Bernoulli")
    p.add_argument(
        "--fit-em",
        type=int,
        metavar="N",
        help="also fit and compare a plain categorical mixture of N components by EM (no VQ-VAE; see em_mixture)",
    )
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--data-dir", help="directory with the dataset files")
    p.add_argument("--limit", type=int, help="first LIMIT test images (default: all)")
    p.add_argument("--rows", type=int, default=64, help="images per block")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-baselines", action="store_true", help="skip PNG/WebP/JPEG XL/gzip/xz")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", help="report.json to write")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    splits = load_dataset(a.dataset, a.data_dir)
    v = splits.test_x[: a.limit]
    report: dict = {
        "dataset": a.dataset,
        "split": "test",
        "images": int(v.shape[0]),
        "rows": a.rows,
        "threads": a.threads,
        "torch": torch.__version__,
        "circuits": {},
    }
    if not a.no_baselines:
        report["standard_codecs"] = standard_codecs(v.reshape(v.shape[0], *v.shape[-2:]).numpy())
    if not a.circuits and not a.fit_em:
        p.error("give circuit files, --fit-em N, or both")
    sources = [(Path(path).name, path) for path in a.circuits]
    if a.fit_em:
        sources.append((f"em-mixture-{a.fit_em}", None))
    for name, path in sources:
        t0 = time.perf_counter()
        c = MixtureCircuit.load(path) if path else em_mixture(splits.train_x, a.fit_em)
        load_s = time.perf_counter() - t0
        res = circuit_compression(
            c, dataset_images(c, v, splits.levels), rows=a.rows, threads=a.threads, progress=a.progress
        )
        res.update({"leaf": c.leaf.kind, "N": len(c), "load_or_fit_seconds": round(load_s, 2)})
        report["circuits"][name] = res
        print(f"{name}: {json.dumps(res)}", file=sys.stderr)
        del c
    print(json.dumps(report))
    if a.out:
        write_json(a.out, report)


if __name__ == "__main__":
    main()
