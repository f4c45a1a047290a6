"""The pipeline's model store: circuit files loaded when read, the showcase picked from sizes alone."""

from __future__ import annotations

from pathlib import Path

import torch

from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core.leaves import Categorical
from vq2pc.data.datasets import load_dataset
from vq2pc.pipeline.config import ExperimentSpec, RunConfig
from vq2pc.pipeline.experiments import _inpainting, showcase_models
from vq2pc.pipeline.rundir import Models


def _circuit(N: int, seed: int) -> MixtureCircuit:
    g = torch.Generator().manual_seed(seed)
    return MixtureCircuit(
        Categorical(torch.randn(N, 3, 4, generator=g).log_softmax(-1)), torch.full((N,), -float(N)).log_softmax(0)
    )


def test_models_load_each_file_when_read(tmp_path: Path) -> None:
    store = Models()
    for key, N in (("sample-N2", 2), ("sample-N4", 4), ("beam-N3-ft", 3)):
        _circuit(N, N).save(tmp_path / f"{key}.safetensors")
        store.add_file(key, tmp_path / f"{key}.safetensors", N)
    first, again = store["sample-N4"], store["sample-N4"]
    assert first is not again  # nothing is held between reads
    x = torch.tensor([[0, 1, 3], [2, 2, 0]])
    assert torch.equal(first.log_prob(x), _circuit(4, 4).log_prob(x))
    (tmp_path / "sample-N2.safetensors").unlink()  # the showcase never reads a circuit it does not show
    shown = showcase_models(store, {"CM": "cm-model"})
    assert list(shown) == ["DMRS (N=4)", "DMBS+FT (N=3)", "CM"]
    assert len(shown["DMRS (N=4)"]) == 4 and shown["CM"] == "cm-model"


def test_inpainting_reads_each_model_once(tmp_path: Path) -> None:
    """Metrics and pictures come from one read of each model: a circuit file is not loaded twice."""
    splits = load_dataset("digits", seed=0, limit=60)
    cfg = RunConfig(experiments=ExperimentSpec(inpainting_eval_images=6, inpainting_images=2))
    g = torch.Generator().manual_seed(0)
    circuit = MixtureCircuit(
        Categorical(torch.randn(5, 64, splits.levels, generator=g).log_softmax(-1)), torch.zeros(5)
    )
    reads: list[str] = []
    store = Models()
    for name in ("a", "b"):
        store.loaders[name] = lambda name=name: reads.append(name) or circuit
    x = splits.test_x.flatten(1).float()
    metrics = _inpainting(cfg, splits, "categorical", store, x, tmp_path / "inpainting.png")
    assert reads == ["a", "b"] and set(metrics) == {"a", "b"}
    assert (tmp_path / "inpainting.png").stat().st_size > 0
