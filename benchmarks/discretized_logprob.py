"""Time and memory of a discretized-leaf circuit's log_prob against the categorical table at equal N.

Prints one JSON line per (N, leaf): leaf, N, B, S, L, threads, seconds (one log_prob of B random
images), cpu_seconds (the process's CPU time over it: with one thread, a measure that a busy machine
inflates less than the wall time), peak_rss_mib (the process's ru_maxrss after the query), query_extra_mib (its growth during
the query: the query's own temporaries), params_mib (the leaf parameters held) and table_mib (what a
full categorical table [S·L, N] float32 takes). Each case runs in its own process, so every peak is
its own (``--same-process``: all in this one, faster to start; peaks then accumulate). Categorical
lines need that table in memory: above --cat-max-N they print ``skipped`` instead.

Leaf parameters are random: means ~ U[0, 1], scales ~ U[0.01, 0.2] (data space [0, 1]); categorical
logits ~ N(0, 1) normalized. Images: integer levels ~ U{0..L-1}.

    python benchmarks/discretized_logprob.py --N 1024 4096 16384 --threads 1
    python benchmarks/discretized_logprob.py                       # N = 1024 ... 65536
    python benchmarks/discretized_logprob.py --N 64 --B 16 --S 20 --levels 8   # seconds (the test's size)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from vq2pc.circuit import MixtureCircuit
from vq2pc.circuit.kernels import categorical_view
from vq2pc.core.leaves import CIRCUIT_LEAF_KINDS, Leaf

LEAVES = ("discretized-gaussian", "discretized-logistic", "categorical")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _leaf(kind: str, n: int, s: int, levels: int, g: torch.Generator) -> Leaf:
    if kind == "categorical":  # built in place as the circuit's [S·L, N] table: one copy, no renormalizing copy
        table = torch.randn(s, levels, n, generator=g)
        for i in range(s):
            table[i] -= table[i].logsumexp(0, keepdim=True)
        return categorical_view(table.reshape(s * levels, n), levels)
    mean, scale = (
        torch.rand(n, s, generator=g),
        torch.rand(n, s, generator=g) * 0.19 + 0.01,
    )
    return CIRCUIT_LEAF_KINDS[kind](mean, scale, levels)


def run_case(a: argparse.Namespace) -> dict:
    """One (N, leaf) case in this process."""
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, a.levels, (a.B, a.S), generator=g).float()
    leaf = _leaf(a.leaf, a.case_N, a.S, a.levels, g)
    circuit = MixtureCircuit(leaf, torch.zeros(a.case_N), memory_budget_mib=a.budget_mib)
    params = sum(t.numel() * t.element_size() for t in circuit.leaf.tensors().values()) / 2**20
    before = _rss_mib()
    start, cpu = time.perf_counter(), time.process_time()
    lp = circuit.log_prob(x)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert bool(torch.isfinite(lp).all())
    return {
        "leaf": a.leaf,
        "N": a.case_N,
        "B": a.B,
        "S": a.S,
        "L": a.levels,
        "threads": a.threads,
        "budget_mib": a.budget_mib,
        "seconds": float(f"{seconds:.4g}"),
        "cpu_seconds": float(f"{cpu:.4g}"),
        "peak_rss_mib": round(_rss_mib(), 1),
        "query_extra_mib": round(_rss_mib() - before, 1),
        "params_mib": round(params, 1),
        "table_mib": round(a.case_N * a.S * a.levels * 4 / 2**20, 1),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    p.add_argument("--B", type=int, default=1000)
    p.add_argument("--S", type=int, default=784)
    p.add_argument("--levels", type=int, default=256)
    p.add_argument("--leaves", nargs="+", default=list(LEAVES), choices=LEAVES)
    p.add_argument("--cat-max-N", type=int, default=4096, help="largest N given a categorical table")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget-mib", type=float, default=1024, help="the circuit's memory budget")
    p.add_argument("--same-process", action="store_true", help="run every case in this process")
    p.add_argument("--leaf", help=argparse.SUPPRESS)  # child process: run one case
    p.add_argument("--case-N", type=int, help=argparse.SUPPRESS)
    return p


def _child(a: argparse.Namespace, leaf: str, n: int) -> str:
    """The JSON line of one case run in a process of its own (its peak memory is its own)."""
    options = {"--B": a.B, "--S": a.S, "--levels": a.levels, "--threads": a.threads, "--budget-mib": a.budget_mib}
    args = [sys.executable, __file__, "--leaf", leaf, "--case-N", str(n)]
    args += [str(x) for pair in options.items() for x in pair]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip()


def _case_line(a: argparse.Namespace, leaf: str, n: int) -> str:
    """The JSON line of the case (N = ``n``, ``leaf``): measured, or ``skipped`` for a categorical table too large."""
    if leaf == "categorical" and n > a.cat_max_N:
        size = n * a.S * a.levels * 4 / 2**30
        why = f"its table [S·L, N] takes {size:.1f} GiB (N > --cat-max-N {a.cat_max_N})"
        return json.dumps({"leaf": leaf, "N": n, "skipped": why})
    if a.same_process:
        return json.dumps(run_case(argparse.Namespace(**{**vars(a), "leaf": leaf, "case_N": n})))
    return _child(a, leaf, n)


def main() -> None:
    a = _parser().parse_args()
    if a.leaf:
        print(json.dumps(run_case(a)), flush=True)
        return
    for n in a.N:
        for leaf in a.leaves:
            print(_case_line(a, leaf, n), flush=True)


if __name__ == "__main__":
    main()
