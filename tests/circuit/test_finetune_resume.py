"""A fine-tuning run killed with SIGKILL mid-training and run again with the same checkpoint path ends with the
same parameters, mixture weights and validation scores, bit for bit, as an uninterrupted run (real processes)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from helpers import finish, kill_during, start_python

from vq2pc.core.checkpoint import CheckpointError
from vq2pc.models.vqvae import VQVAE, VQVAEConfig

pytestmark = pytest.mark.slow

EPOCHS = 12
# posterior picks re-decoded every 3 steps of a 19-step epoch, cosine schedule, learned weights
SCRIPT = f"""
import sys, torch
from vq2pc.circuit.finetune import FineTuneConfig, finetune
from vq2pc.data.datasets import load_dataset
from vq2pc.models.vqvae import VQVAE
torch.set_num_threads(1)
folder, name = sys.argv[1], sys.argv[2]
vqvae, codes = VQVAE.load(folder + "/vqvae.pt"), torch.load(folder + "/codes.pt")
cfg = FineTuneConfig(epochs={EPOCHS}, patience={EPOCHS}, lr=3e-3, schedule="cosine", batch_size=16, top_k=2,
                     refresh=3, progress=False)
res = finetune(vqvae, codes, torch.zeros(len(codes)), load_dataset("digits", seed=0, limit=300), cfg,
               checkpoint=folder + "/" + name + ".pt")
torch.save({{"decoder": res.decoder.state_dict(), "log_weights": res.log_weights, "history": res.history,
            "best": (res.start_val_log_prob, res.best_val_log_prob, res.best_epoch, res.epochs_run)}},
           folder + "/" + name + ".out")
"""


def _start(folder: Path, name: str) -> subprocess.Popen:
    return start_python(["-c", SCRIPT, str(folder), name])


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ft-resume")
    torch.manual_seed(0)
    VQVAE(VQVAEConfig(image_shape=(1, 8, 8), levels=17, latent_hw=(2, 2), K=8, D=4, hidden=8, res_blocks=0)).save(
        d / "vqvae.pt"
    )
    torch.save(
        torch.unique(torch.randint(0, 8, (12, 2, 2), generator=torch.Generator().manual_seed(3)), dim=0), d / "codes.pt"
    )
    return d


def test_killed_finetuning_resumes_to_the_same_numbers(folder: Path) -> None:
    straight, killed = _start(folder, "straight"), _start(folder, "killed")
    epochs = kill_during(killed, folder / "killed.pt", "finetune")
    assert 1 <= epochs < EPOCHS, "the kill did not land during fine-tuning"
    assert not (folder / "killed.out").exists()
    finish(_start(folder, "killed"))
    finish(straight)
    a, b = torch.load(folder / "straight.out"), torch.load(folder / "killed.out")
    assert a["best"] == b["best"] and a["best"][2] >= 1 and a["best"][3] == EPOCHS
    assert a["history"] == b["history"]  # training losses, validation log-likelihoods (so BPDs) and learning rates
    assert torch.equal(a["log_weights"], b["log_weights"])
    assert a["decoder"].keys() == b["decoder"].keys()
    assert all(torch.equal(a["decoder"][k], b["decoder"][k]) for k in a["decoder"])


def test_a_checkpoint_of_other_latents_is_refused(folder: Path) -> None:
    """Resuming with other latents (same N) would train a decoder for the wrong mixture: one clear error."""
    from vq2pc.circuit.finetune import FineTuneConfig, finetune
    from vq2pc.data.datasets import load_dataset

    if not (folder / "straight.pt").exists():
        pytest.skip("needs the checkpoint of the test above")
    codes = torch.load(folder / "codes.pt")
    cfg = FineTuneConfig(
        epochs=EPOCHS, patience=EPOCHS, lr=3e-3, schedule="cosine", batch_size=16, top_k=2, refresh=3, progress=False
    )
    with pytest.raises(CheckpointError, match="selection_sha256"):
        finetune(
            VQVAE.load(folder / "vqvae.pt"),
            codes.flip(0),
            torch.zeros(len(codes)),
            load_dataset("digits", seed=0, limit=300),
            cfg,
            checkpoint=folder / "straight.pt",
        )
