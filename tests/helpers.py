"""Small builders shared by several test modules."""

import dataclasses
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy.stats import chi2

from vq2pc.baselines.cm import CMConfig
from vq2pc.circuit.finetune import FineTuneConfig
from vq2pc.core.checkpoint import load_checkpoint
from vq2pc.data.datasets import DataSplits
from vq2pc.models.priors.pixelcnn import PixelCNNPrior, PriorConfig
from vq2pc.models.priors.transformer import TransformerPrior, TransformerPriorConfig
from vq2pc.models.train import TrainConfig
from vq2pc.models.vqvae import VQVAE, VQVAEConfig, train_vqvae
from vq2pc.pipeline.config import BaselineSpec, ExperimentSpec, ModelSpec, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
MNIST_FILE = "train-images-idx3-ubyte.gz"


def find_mnist() -> Path | None:
    """The folder of the MNIST IDX files, found as a user's run finds it: ``$VQ2PC_DATA`` (the folder or its
    ``mnist/``), else ``../shared/data`` beside the repository (where CI puts it); None when neither has them."""
    bases = [Path(d) for d in (os.environ.get("VQ2PC_DATA"),) if d] + [ROOT.parent / "shared" / "data"]
    for base in bases:
        for folder in (base / "mnist", base):
            if (folder / MNIST_FILE).is_file():
                return folder
    return None


MNIST_DIR = find_mnist()
"""The MNIST IDX folder (None without it); ``MNIST_DIR.parent`` is a ``--data-dir`` when it is a ``mnist/``."""
needs_mnist = pytest.mark.skipif(
    MNIST_DIR is None,
    reason="real MNIST not found: set $VQ2PC_DATA to the folder of "
    "its IDX files, or put them in ../shared/data/mnist beside the repository",
)


def make_prior(
    K: int = 3,
    hw: tuple[int, int] = (2, 2),
    C: int = 2,
    hidden: int = 8,
    layers: int = 3,
    seed: int = 0,
    sharpen: float = 1.0,
) -> PixelCNNPrior:
    torch.manual_seed(seed)
    prior = PixelCNNPrior(PriorConfig(K=K, latent_hw=hw, num_classes=C, hidden=hidden, layers=layers)).eval()
    with torch.no_grad():  # sharpen > 1: further from uniform, classes further apart
        prior.head[-1].weight.mul_(sharpen)
        for layer in prior.layers:
            layer.cond.weight.mul_(sharpen)
    return prior


def make_transformer(
    K: int = 3,
    hw: tuple[int, int] = (2, 2),
    C: int = 2,
    d: int = 8,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
    sharpen: float = 1.0,
) -> TransformerPrior:
    torch.manual_seed(seed)
    cfg = TransformerPriorConfig(K=K, latent_hw=hw, num_classes=C, d_model=d, layers=layers, heads=heads)
    prior = TransformerPrior(cfg).eval()
    with torch.no_grad():  # sharpen > 1: further from uniform, classes further apart
        prior.head.weight.mul_(sharpen)
        prior.class_embed.weight.mul_(20 * sharpen)  # init std 0.02: make the classes differ
    return prior


def all_codes(K: int, hw: tuple[int, int]) -> torch.Tensor:
    """Every grid in row-major lexicographic order: [K^{hw}, h, w]."""
    return torch.tensor(list(itertools.product(range(K), repeat=hw[0] * hw[1]))).view(-1, *hw)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world: int, port: int, fn, args: tuple) -> None:
    import datetime
    import os
    import sys

    import torch.distributed as dist

    from vq2pc.core.distributed import shutdown

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        fn(rank, *args)
    except BaseException:
        dist.destroy_process_group()
        raise
    shutdown(wait=True)
    # A rank's results are on disk by now. Leave without interpreter finalization: gloo's worker threads
    # can abort the process while Python tears down (an exit-time race of the library, not of the code
    # under test), which would fail a test whose ranks all finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(fn, world: int, *args, timeout: float = 600.0) -> None:
    """Run ``fn(rank, *args)`` in ``world`` fresh processes joined in a gloo process group on 127.0.0.1.

    ``fn`` must be a module-level function (it is pickled by name). Raises if a rank fails; kills the
    ranks and raises ``TimeoutError`` after ``timeout`` seconds, so a collective mismatch never hangs.
    The limits are generous because a loaded 2-core machine can starve a rank for minutes; unloaded,
    each call takes seconds."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _rank_entry, args=(world, free_port(), fn, args), nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"distributed test ranks still running after {timeout:.0f} s")


def tiny_vqvae(splits: DataSplits, epochs: int) -> VQVAE:
    """A Gaussian VQ-VAE (2×2 grid, K = 8, D = 4, 8 channels) trained ``epochs`` epochs on ``splits``."""
    arch = {"latent_hw": (2, 2), "K": 8, "D": 4, "hidden": 8, "res_blocks": 0}
    cfg = VQVAEConfig(image_shape=splits.image_shape, levels=splits.levels, leaf="gaussian", **arch)
    return train_vqvae(splits, cfg, TrainConfig(epochs=epochs, batch_size=64, lr=3e-3, progress=False))[0]


def tiny_cm_paper(image_shape: tuple[int, ...], levels: int, **kw: Any) -> CMConfig:
    """A Gaussian continuous mixture of the paper recipe small enough for tests (64 grid points, 4 channels);
    ``kw`` overrides its settings."""
    small = {"latent_dim": 3, "channels": 4, "feature_hw": (2, 2), "points": 64, "refresh": 2}
    return CMConfig(image_shape, **{"leaf": "gaussian", "levels": levels, "recipe": "paper", **small, **kw})


def assert_sample_frequencies(model: Any, levels: int, s: int, seed: int, n: int = 20000) -> None:
    """``n`` unconditional draws ``[n, S]`` of ``model`` over every ``levels^S`` image pass a chi-square test
    against ``exp(model.log_prob)`` at level 0.001."""
    draws = model.sample(n, generator=torch.Generator().manual_seed(seed))
    assert draws.shape == (n, s)
    xs = torch.tensor(list(itertools.product(range(levels), repeat=s)), dtype=torch.float32)
    p = model.log_prob(xs).double().exp()
    counts = (draws[:, None, :] == xs[None]).all(-1).sum(0).double()
    stat = ((counts - n * p) ** 2 / (n * p)).sum().item()
    assert stat < chi2.ppf(0.999, len(xs) - 1), stat


def start_python(args: list[str], cwd: Path | None = None) -> subprocess.Popen:
    """``python *args`` in a process of its own on one thread (stderr kept for the failure message)."""
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def finish(proc: subprocess.Popen) -> None:
    """Wait for ``proc`` (at most 10 minutes); it must succeed."""
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err


def kill_during(proc: subprocess.Popen, checkpoint: Path, kind: str) -> int:
    """SIGKILL ``proc`` as soon as ``checkpoint`` holds a finished epoch; returns the epochs it holds."""
    deadline = time.monotonic() + 300
    while not checkpoint.exists():
        assert proc.poll() is None, f"the run ended before writing {checkpoint}: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"no {checkpoint} after 300 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    return int(load_checkpoint(checkpoint, kind)["train_state"]["epoch"])


def synthetic_codes(n: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Structured codes: z01 = z00 + c, z10 = z00, z11 = z00 + z01 (mod K)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 2, (n,), generator=g)
    z00 = torch.randint(0, K, (n,), generator=g)
    z01 = (z00 + c) % K
    z = torch.stack([z00, z01, z00, (z00 + z01) % K], 1).view(n, 2, 2)
    return z, c


# The pipeline tests' tiny run (tests/pipeline)
LIMIT = 150
STRATEGIES = ["exhaustive", "sample", "beam", "topk", "data"]


def tiny_config(leaves: list[str], epochs: int = 1, N: list[int] | None = None, full: bool = True) -> RunConfig:
    """K=4 on a 2x2 grid (256 latents), 8 hidden channels, one epoch; ``full`` adds baselines and experiments.

    N defaults to [10, 32]: digits has C=10 classes and DMBS needs N >= starts·C.
    """
    train = TrainConfig(epochs=epochs, patience=5, lr=2e-3, batch_size=64, progress=False)
    model = ModelSpec(
        name="m",
        K=4,
        D=4,
        hidden=8,
        res_blocks=0,
        prior_hidden=8,
        prior_layers=1,
        strategies=STRATEGIES if full else ["topk"],
        N=N or ([10, 32] if full else [4]),
        starts=1,
        ft_strategies=["sample"] if full else [],
        finetune=FineTuneConfig(epochs=2, lr=3e-3, batch_size=50, top_k=2, refresh=2),
    )
    baselines = BaselineSpec(
        einet_pieces=[2], einet_inputs=[1], cm_points=64, cm_train_points=32, cm_hidden=8, einet=full, cm=full
    )
    experiments = ExperimentSpec(
        num_samples=50,
        inpainting_eval_images=20,
        correlation_images=20,
        usage=full,
        inpainting=full,
        samples=full,
        correlation=full,
        classification=full,
        classification_fit=full,
        classification_images=40,
        classification_fractions=[0.5],
    )
    cfg = load_config(None, {"limit": LIMIT})
    return dataclasses.replace(
        cfg,
        leaves=leaves,
        models=[model],
        vqvae_train=train,
        prior_train=train,
        baseline_train=dataclasses.replace(train, max_seconds=10),
        baselines=baselines,
        experiments=experiments,
    )


def mtimes(root: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.glob(pattern))}


def tree_latent_grids(c: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Every latent grid of a tree circuit ``c`` by enumeration: ``(z [G, M], log p(z) [G])``, ``G = K^M``."""
    root, edges, _ = (t.detach() for t in c.log_params())
    zs = torch.tensor(list(itertools.product(range(c.K), repeat=c.tree.num_nodes)))
    t = c.tree
    child_terms = edges[torch.arange(t.children.numel()), zs[:, t.parent[t.children]], zs[:, t.children]]
    return zs, root[zs[:, t.root]] + child_terms.sum(1)
