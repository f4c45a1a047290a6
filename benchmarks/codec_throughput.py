"""Throughput of the circuit codec (``vq2pc.circuit.codec``): encode and decode images/s on one JSON line.

A random categorical circuit (``N`` components, ``S`` pixels, ``L`` levels; logits ~ scale·N(0, 1),
normalized) codes ``B`` images sampled from it. A dense predictive product would be one ``[R, N] × [N, L]``
product per block of ``R`` images and pixel, ``2·B·S·N·L`` flops in all (1.6·10¹² at N = 4096, S = 784,
L = 256, B = 1000); the codec multiplies only the components still active in each posterior row (≥ 2⁻⁵⁰
of the leader; one row per class of images with equal pixels so far), which for images drawn from a
random circuit are few after some pixels — a favourable case. ``dense_gflops`` reports the dense flop
count divided by the time (what a dense product would need to keep up).

    python benchmarks/codec_throughput.py --N 4096 --S 784 --L 256 --images 1000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from vq2pc import MixtureCircuit
from vq2pc.circuit.codec import decode, encode
from vq2pc.circuit.kernels import normalized_categorical


def random_circuit(n: int, s: int, levels: int, scale: float, seed: int) -> MixtureCircuit:
    """Normalized random logits built in the table layout ``[S, L, N]`` (no copy of the table)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(s, levels, n, generator=g).mul_(scale)
    for i in range(0, s, 16):  # normalize over L, 16 pixels at a time (bounded temporaries)
        table[i : i + 16] -= torch.logsumexp(table[i : i + 16], 1, keepdim=True)
    leaf = normalized_categorical(table.permute(2, 0, 1))
    return MixtureCircuit(leaf, torch.zeros(n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=4096)
    p.add_argument("--S", type=int, default=784)
    p.add_argument("--L", type=int, default=256)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--rows", type=int, default=64, help="images per block")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.0, help="logit scale (smaller: flatter leaves, broader posteriors)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    c = random_circuit(a.N, a.S, a.L, a.scale, a.seed)
    x = c.sample(a.images, generator=torch.Generator().manual_seed(a.seed + 1)).long()
    t0 = time.perf_counter()
    data = encode(c, x, rows=a.rows, threads=a.threads)
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    y = decode(c, data, threads=a.threads)
    t_dec = time.perf_counter() - t0
    assert np.array_equal(y.reshape(a.images, -1), x.numpy()), "round trip failed"
    t0 = time.perf_counter()
    decode(c, data, indices=[a.images // 2], threads=a.threads)
    t_one = time.perf_counter() - t0
    log_p = torch.cat([c.log_prob(x[i : i + 256].float()) for i in range(0, a.images, 256)])
    flops = 2.0 * a.images * a.S * a.N * a.L
    print(
        json.dumps(
            {
                "N": a.N,
                "S": a.S,
                "L": a.L,
                "images": a.images,
                "rows": a.rows,
                "threads": a.threads,
                "scale": a.scale,
                "encode_images_per_s": round(a.images / t_enc, 2),
                "decode_images_per_s": round(a.images / t_dec, 2),
                "random_access_one_image_s": round(t_one, 3),
                "encode_s": round(t_enc, 3),
                "decode_s": round(t_dec, 3),
                "dense_flops": flops,
                "dense_gflops_encode": round(flops / t_enc / 1e9, 1),
                "bits_per_pixel": 8 * len(data) / (a.images * a.S),
                "model_bpd": float(-log_p.double().mean() / (a.S * math.log(2))),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
