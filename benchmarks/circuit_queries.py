"""Speed and memory of MixtureCircuit queries against the machine's matmul rate and the slow way.

Prints one JSON line per case: query, leaf, N, B, S, seconds (median of --repeat
calls; seconds_min is the fastest), fraction_of_matmul (median seconds of one
float32 matmul of the log_prob shape [B, 2S] x [2S, N], measured in this process,
divided by the query's seconds), speedup_vs_slow (the slow way's seconds divided
by the query's), peak_rss_mib (ru_maxrss so far) and note. Categorical lines also
carry times_gaussian: their seconds over a Gaussian log_prob's at the same N.

The slow way is the published code's: a loop over chunks of 8 components with a
B x 8 x S broadcast; it is timed on a few chunks and scaled to N (said in note).

Parameters: Gaussian means ~ U[0, 1], std ~ U[0.1, 0.5] (every pixel on the float32
path); ``gaussian-floor``: means 0.5 ± 0.01, std = 1e-3 (every pixel on the float64
path, see vq2pc.circuit.kernels). Categorical: random logits over --levels levels;
its table is N·S·L floats, so it runs with --cat-N components (default: the largest
power of two whose table fits in 1 GiB) and its fraction is against a matmul of that N.
``--data mnist``: components centred on MNIST training images, x = test images (80% of
their pixels are black: the categorical kernel's background plan, vq2pc.circuit.kernels).

    python benchmarks/circuit_queries.py --N 2048 --B 1000       # quick
    python benchmarks/circuit_queries.py --data mnist             # real images (MNIST IDX files)
    python benchmarks/circuit_queries.py                          # N=16384, S=784, B=10000
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from typing import Callable

import torch

from vq2pc.circuit import MixtureCircuit
from vq2pc.core.leaves import Categorical, Gaussian
from vq2pc.data.idx import load_idx_dataset


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_seconds(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, min) wall seconds of ``repeat`` calls."""
    times = [_timed(fn) for _ in range(repeat)]
    return statistics.median(times), min(times)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _matmul_seconds(b: int, s: int, n: int, g: torch.Generator, repeat: int) -> tuple[float, float]:
    x, w = torch.rand(b, 2 * s, generator=g), torch.rand(2 * s, n, generator=g)
    _timed(lambda: x[:64] @ w)  # warm-up
    return _median_seconds(lambda: x @ w, repeat)


def _mnist(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train [60000, 784], test [B, 784])`` MNIST levels 0..255 as float32, from --mnist-dir."""
    arrays = load_idx_dataset("mnist", args.mnist_dir, download=False)
    train = torch.from_numpy(arrays["train_images"]).flatten(1).float()
    return train, torch.from_numpy(arrays["test_images"][: args.B]).flatten(1).float()


def _image_circuit(leaf: str, images: torch.Tensor, levels: int, g: torch.Generator) -> MixtureCircuit:
    """Components centred on ``images [N, S]`` (levels): Gaussian std ~ U[0.1, 0.3] in [0, 1] units,
    or a discretized Gaussian of std 16 levels (distilled circuits look like this: mostly-black borders)."""
    lw = torch.randn(len(images), generator=g)
    centre = images * (levels - 1) / 255.0
    if leaf == "gaussian":
        std = 0.1 + 0.2 * torch.rand(images.shape, generator=g)
        return MixtureCircuit(Gaussian(centre / (levels - 1), std), lw)
    grid = torch.arange(levels, dtype=torch.float32)
    return MixtureCircuit(Categorical(-0.5 * ((grid - centre[..., None]) / 16.0) ** 2), lw)


def _circuit(leaf: str, n: int, s: int, levels: int, g: torch.Generator) -> tuple[MixtureCircuit, torch.Tensor]:
    lw = torch.randn(n, generator=g)
    if leaf == "gaussian":
        mean, std = torch.rand(n, s, generator=g), 0.1 + 0.4 * torch.rand(n, s, generator=g)
    elif leaf == "gaussian-floor":
        mean, std = 0.5 + 0.01 * torch.randn(n, s, generator=g), torch.full((n, s), 1e-3)
    else:
        return MixtureCircuit(Categorical(torch.randn(n, s, levels, generator=g)), lw), lw
    return MixtureCircuit(Gaussian(mean, std), lw), lw


def _data(c: MixtureCircuit, b: int, g: torch.Generator) -> torch.Tensor:
    if c.leaf.kind == "categorical":
        return torch.randint(0, c.leaf.num_levels, (b, c.num_variables), generator=g).float()
    idx = torch.randint(0, len(c), (b,), generator=g)
    return c.leaf.loc[idx] + 0.01 * torch.randn(b, c.num_variables, generator=g)


def _slow_log_prob_seconds(c: MixtureCircuit, x: torch.Tensor, chunks: int) -> float:
    """The published code's way, timed on ``chunks`` chunks of 8 components and scaled to N."""
    total = (len(c) + 7) // 8
    chunks = min(chunks, total)

    def run() -> torch.Tensor:
        lls = [c.leaf[i * 8 : (i + 1) * 8].log_prob(x[:, None, :]).sum(-1) for i in range(chunks)]
        return torch.logsumexp(torch.cat(lls, 1) + c.log_weights[: chunks * 8], 1)

    return _timed(run) * total / chunks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--S", type=int, default=784)
    ap.add_argument("--B", type=int, default=10000)
    ap.add_argument(
        "--leaves", default="gaussian,categorical", help="comma list of gaussian, gaussian-floor, categorical"
    )
    ap.add_argument("--levels", type=int, default=256)
    ap.add_argument("--cat-N", type=int, default=None, help="components of the categorical circuit (see module doc)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--slow-chunks", type=int, default=4, help="chunks of 8 components timed for the slow way")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per case; seconds is their median")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--data",
        choices=["synthetic", "mnist"],
        default="synthetic",
        help="mnist: components centred on N training images, x = the first B test images",
    )
    ap.add_argument(
        "--mnist-dir",
        default=None,
        help="directory with the four MNIST IDX files (with --data mnist; else $VQ2PC_DATA, else ~/.cache/vq2pc)",
    )
    args = ap.parse_args()
    if args.data == "mnist" and args.S != 784:
        ap.error("--data mnist needs --S 784")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    cat_n = args.cat_N or min(args.N, 1 << max(0, ((1 << 30) // (args.S * args.levels * 4)).bit_length() - 1))
    matmul: dict[int, float] = {}
    for leaf in args.leaves.split(","):
        n = cat_n if leaf == "categorical" else args.N
        if n not in matmul:
            mm = _matmul_seconds(args.B, args.S, n, g, args.repeat)
            matmul[n] = mm[0]
            _emit("matmul_f32", "-", n, args, mm, matmul[n], None, f"[B,2S]x[2S,N] float32, {args.threads} threads")
        c, x = _case(leaf, n, args, g)
        mask = torch.rand(x.shape, generator=g) < 0.5
        slow = _slow_log_prob_seconds(c, x, args.slow_chunks)
        note = (
            f"slow way timed on {min(args.slow_chunks, (n + 7) // 8)} of {(n + 7) // 8} chunks of 8 components, scaled"
        )
        gauss = _gaussian_log_prob_seconds(n, args, g) if leaf == "categorical" else None
        queries = _queries(c, x, mask)
        c.log_prob(x[:8], mask=mask[:8])  # warm-up (and component-mean cache outside the timings)
        c.component_means()
        for name, fn in queries.items():
            times = _median_seconds(fn, args.repeat)
            extra = (
                {}
                if gauss is None
                else {"gaussian_log_prob_seconds": round(gauss, 6), "times_gaussian": round(times[0] / gauss, 2)}
            )
            _emit(name, leaf, n, args, times, matmul[n], slow, note, extra)
        del c, x


def _case(leaf: str, n: int, args: argparse.Namespace, g: torch.Generator) -> tuple[MixtureCircuit, torch.Tensor]:
    """The circuit and data ``x [B, S]`` of one case (in the leaf's space)."""
    if args.data == "synthetic":
        c, _ = _circuit(leaf, n, args.S, args.levels, g)
        return c, _data(c, args.B, g)
    train, test = _mnist(args)
    c = _image_circuit(leaf, train[torch.randperm(len(train), generator=g)[:n]], args.levels, g)
    x = test * (args.levels - 1) / 255.0
    return c, (x.round() if leaf == "categorical" else x / (args.levels - 1))


def _gaussian_log_prob_seconds(n: int, args: argparse.Namespace, g: torch.Generator) -> float:
    """Median seconds of a Gaussian circuit's log_prob with ``n`` components (the categorical's yardstick)."""
    c, x = _case("gaussian", n, args, g)
    c.log_prob(x[:8])
    return _median_seconds(lambda: c.log_prob(x), args.repeat)[0]


def _queries(c: MixtureCircuit, x: torch.Tensor, mask: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The timed queries, by name."""
    return {
        "log_prob": lambda: c.log_prob(x),
        "log_prob_masked": lambda: c.log_prob(x, mask=mask),
        "posterior": lambda: c.posterior(x, mask=mask),
        "conditional_mean": lambda: c.conditional_mean(x, mask=mask),
    }


def _emit(
    query: str,
    leaf: str,
    n: int,
    args: argparse.Namespace,
    times: tuple[float, float],
    mm: float,
    slow: float | None,
    note: str,
    extra: dict[str, float] | None = None,
) -> None:
    sec = times[0]
    line = {
        "query": query,
        "leaf": leaf,
        "N": n,
        "B": args.B,
        "S": args.S,
        "seconds": round(sec, 6),
        "seconds_min": round(times[1], 6),
        "repeats": args.repeat,
        "fraction_of_matmul": round(mm / sec, 3),
        "speedup_vs_slow": None if slow is None else round(slow / sec, 1),
        "peak_rss_mib": round(_rss_mib(), 1),
        "note": note,
        **(extra or {}),
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
