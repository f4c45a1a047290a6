"""``vq2pc compress`` and ``vq2pc decompress``: lossless image files coded with a discrete circuit."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from vq2pc.circuit import codec
from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.cli.options import add_parser, option, out_option
from vq2pc.core.files import atomic_write
from vq2pc.data.datasets import DATASET_NAMES, load_dataset


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compress`` and ``decompress`` verbs."""
    p = add_parser(
        subparsers,
        "compress",
        help="losslessly compress images with a categorical/Bernoulli circuit (size = the model's BPD)",
        description="Entropy-code images with the circuit's exact pixel conditionals p̂(x_i | x_<i): the file "
        "takes -log2 p̂(x) bits per image plus a small header. Prints a JSON summary.",
    )
    p.add_argument("circuit", help="circuit file (.safetensors) written by MixtureCircuit.save")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help=".npy of integer images [n, ...] (levels 0..L-1)")
    option(src, "dataset", choices=DATASET_NAMES, help="compress a split of this dataset")
    option(p, "data_dir", help="directory with the dataset files (default: $VQ2PC_DATA, else ~/.cache/vq2pc)")
    p.add_argument("--split", choices=["train", "val", "test"], default="test", help="dataset split")
    option(p, "limit", type=int, help="only the first LIMIT images")
    p.add_argument("--rows", type=int, default=codec.DEFAULT_ROWS, help="images per block (the random-access unit)")
    _shared(p)
    out_option(p, "compressed file to write (.vq2pc)", required=True)
    p.set_defaults(func=cmd_compress)

    p = add_parser(
        subparsers,
        "decompress",
        help="decode a file written by `vq2pc compress` (all images, or some by index)",
        description="Decode a compressed file with the circuit that wrote it; writes the images as .npy.",
    )
    p.add_argument("circuit", help="the circuit file the images were compressed with")
    p.add_argument("compressed", help="file written by `vq2pc compress`")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--index", type=int, nargs="+", help="decode only these images (random access)")
    sel.add_argument("--images-range", metavar="A:B", help="decode only images A..B-1")
    _shared(p)
    out_option(p, ".npy to write the images to", required=True)
    p.set_defaults(func=cmd_decompress)


def _shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, help="worker threads (default: torch's thread count)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _images(args: argparse.Namespace, c: MixtureCircuit) -> torch.Tensor:
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.dataset:
        splits = load_dataset(args.dataset, args.data_dir)
        v = {"train": splits.train_x, "val": splits.val_x, "test": splits.test_x}[args.split][: args.limit]
        return codec.dataset_images(c, v, splits.levels)
    if not Path(args.images).is_file():
        raise FileNotFoundError(f"images file not found: {args.images}")
    try:
        arr = np.load(args.images, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"cannot read images file {args.images}: not a numeric .npy array ({exc})") from None
    if arr.dtype.kind not in "ui":
        raise ValueError(f"images file {args.images} must hold integer levels, got dtype {arr.dtype}")
    return torch.from_numpy(arr[: args.limit].astype(np.int64))


def cmd_compress(args: argparse.Namespace) -> int:
    c = MixtureCircuit.load(args.circuit)
    x = _images(args, c)
    t0 = time.perf_counter()
    data = codec.encode(c, x, rows=args.rows, threads=args.threads, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    codec.save_compressed(args.out, data)
    n, s = int(x.shape[0]), c.num_variables
    log_p = torch.cat([c.log_prob(x[i : i + 1024].reshape(-1, s).float()) for i in range(0, n, 1024)])
    print(
        json.dumps(
            {
                "images": n,
                "bytes": len(data),
                "bits_per_pixel": 8 * len(data) / (n * s),
                "model_bpd": float(-log_p.double().mean() / (s * math.log(2))),
                "seconds": round(seconds, 3),
                "images_per_second": round(n / seconds, 2),
                "out": args.out,
            }
        )
    )
    return 0


def _save_npy(path: Path, y: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
        np.save(f, y)


def cmd_decompress(args: argparse.Namespace) -> int:
    c = MixtureCircuit.load(args.circuit)
    data = codec.load_compressed(args.compressed)
    indices = args.index
    if args.images_range:
        a, sep, b = args.images_range.partition(":")
        if not sep or not a.strip().isdigit() or not b.strip().isdigit() or int(a) >= int(b):
            raise ValueError(f"--images-range must be A:B with 0 <= A < B, got {args.images_range!r}")
        indices = range(int(a), min(int(b), codec.read_header(data).count))
    t0 = time.perf_counter()
    y = codec.decode(c, data, indices=indices, threads=args.threads, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    atomic_write(args.out, lambda p: _save_npy(p, y))
    print(
        json.dumps(
            {
                "images": int(y.shape[0]),
                "shape": list(y.shape),
                "seconds": round(seconds, 3),
                "images_per_second": round(y.shape[0] / seconds, 2),
                "out": args.out,
            }
        )
    )
    return 0
