"""Checkpoints written before the model configs were settings classes still load: their config dicts
(the same keys, plain values; tuples, or lists as JSON gives them) rebuild the same model."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

from vq2pc.core.checkpoint import save_checkpoint
from vq2pc.models.priors.pixelcnn import PixelCNNPrior
from vq2pc.models.priors.transformer import TransformerPrior
from vq2pc.models.vqvae import VQVAE

OLD_RECORDS: list[tuple[type, dict[str, Any]]] = [  # the dicts ``asdict`` wrote for these configs
    (
        VQVAE,
        {
            "image_shape": (1, 8, 8),
            "levels": 17,
            "leaf": "gaussian",
            "latent_hw": (2, 2),
            "K": 8,
            "D": 4,
            "hidden": 16,
            "res_blocks": 1,
            "beta": 0.25,
            "quantizer": "ema",
            "quantizer_opts": {"kmeans_init": True},
        },
    ),
    (PixelCNNPrior, {"K": 8, "latent_hw": (2, 2), "num_classes": 10, "hidden": 16, "layers": 2}),
    (TransformerPrior, {"K": 8, "latent_hw": (2, 2), "num_classes": 10, "d_model": 16, "layers": 1, "heads": 4}),
]


@pytest.mark.parametrize("as_lists", [False, True])
@pytest.mark.parametrize("model_class, record", OLD_RECORDS, ids=lambda v: getattr(v, "__name__", ""))
def test_an_older_checkpoint_loads_into_the_same_model(
    tmp_path: Path, model_class: type, record: dict[str, Any], as_lists: bool
) -> None:
    torch.manual_seed(0)
    model = model_class(model_class.config_class(**record)).eval()
    stored = {k: list(v) if as_lists and isinstance(v, tuple) else v for k, v in record.items()}
    path = save_checkpoint(
        tmp_path / "old.pt", model_class.checkpoint_kind, {"config": stored, "state_dict": model.state_dict()}
    )
    loaded = model_class.load(path)
    assert repr(asdict(loaded.cfg)) == repr(record)  # same values, same types (tuples stay tuples)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
