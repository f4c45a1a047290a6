"""Tests of the torch.distributed helpers: no-ops in one process, exact collectives over 2 gloo ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import spawn_ranks

from vq2pc.core import distributed as D
from vq2pc.core.files import atomic_write


def test_single_process_is_a_world_of_one(tmp_path: Path) -> None:
    assert not D.is_distributed() and D.rank() == 0 and D.world_size() == 1 and D.is_main()
    t = torch.tensor([0.5, -torch.inf])
    assert D.all_reduce_logsumexp(t) is t and D.gather_rows(t) is t and D.all_reduce_sum(t) is t
    assert D.init_from_env("cpu") == "cpu"  # no torchrun environment: nothing to start
    D.barrier()
    assert D.shard_range(10) == (0, 10)
    assert [D.shard_range(7, r, 3) for r in range(3)] == [(0, 2), (2, 4), (4, 7)]
    assert atomic_write(tmp_path / "a.txt", lambda p: p.write_text("x")).read_text() == "x"


def _collectives(rank: int, out: str) -> None:
    g = torch.Generator().manual_seed(rank)
    local = torch.randn(5, generator=g, dtype=torch.float64) * 30
    local[0] = -torch.inf  # -inf on every rank stays -inf
    if rank == 1:
        local[1] = -torch.inf  # on one rank only: the other rank's value
    lo, hi = D.shard_range(7)
    rows = torch.arange(lo, hi, dtype=torch.float32)[:, None].repeat(1, 3)
    path = Path(out) / "shared.txt"
    atomic_write(path, lambda p: p.write_text(f"rank {D.rank()}"))
    seen = path.read_text()  # the second barrier: in place for every rank
    torch.save(
        {
            "local": local,
            "lse": D.all_reduce_logsumexp(local),
            "rows": D.gather_rows(rows),
            "seen": seen,
            "world": D.world_size(),
        },
        Path(out) / f"rank{rank}.pt",
    )


@pytest.mark.slow
def test_two_ranks_logsumexp_gather_and_collective_write(tmp_path: Path) -> None:
    spawn_ranks(_collectives, 2, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    ref = torch.logsumexp(torch.stack([r0["local"], r1["local"]]), 0)
    assert ref[0] == -torch.inf and torch.isfinite(ref[1:]).all()
    for r in (r0, r1):
        assert r["world"] == 2 and r["seen"] == "rank 0"  # rank 0 alone wrote; every rank saw it
        torch.testing.assert_close(r["lse"], ref, atol=1e-12, rtol=0)
        assert torch.equal(r["rows"], torch.arange(7, dtype=torch.float32)[:, None].repeat(1, 3))
