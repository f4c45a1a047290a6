"""Paired comparison of two models on the same test images, from their per-image BPD files.

Reads two ``.npy`` files of per-image test BPDs (``vq2pc train-baseline`` writes ``OUT/<key>.test_bpd.npy``;
``benchmarks/mnist_tree_circuit.py --per-image`` writes the tree circuit's) and prints ONE JSON line: both
means, the mean per-image difference A − B with its 95% interval, and the fraction of images A codes in
fewer bits. A difference whose interval excludes 0 is a margin a reviewer accepts; two means alone are not.

    python benchmarks/paired_bpd.py tree.test_bpd.npy runs/field/quad-graph-cp-64.test_bpd.npy
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vq2pc.evaluate.density import paired_difference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path, help="per-image BPDs of model A (.npy)")
    p.add_argument("b", type=Path, help="per-image BPDs of model B (.npy), the same images in the same order")
    a = p.parse_args()
    row = paired_difference(torch.from_numpy(np.load(a.a)), torch.from_numpy(np.load(a.b)))
    print(json.dumps({"a": a.a.name, "b": a.b.name, **{k: _round(v) for k, v in row.items()}}))


def _round(v: float | int | list[float]) -> float | int | list[float]:
    return [round(x, 5) for x in v] if isinstance(v, list) else round(v, 5) if isinstance(v, float) else v


if __name__ == "__main__":
    main()
