"""End to end: ``run_pipeline`` on a tiny digits config — report, figures, caching, --force, resume, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import LIMIT, STRATEGIES, mtimes, tiny_config

import vq2pc.models.train as train_module
from vq2pc.circuit import MixtureCircuit
from vq2pc.core.checkpoint import CheckpointError, load_checkpoint
from vq2pc.data import load_dataset
from vq2pc.evaluate.density import test_bpd
from vq2pc.pipeline import run_pipeline
from vq2pc.pipeline.classification import FITTED
from vq2pc.pipeline.config import load_config

pytestmark = pytest.mark.slow

DM_FAMILIES = {"sample": "DMRS", "beam": "DMBS", "topk": "TopK", "data": "DMData"}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run with both leaf kinds, every strategy, the baselines and every experiment."""
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(["gaussian", "categorical"])
    start = time.perf_counter()
    report = run_pipeline(cfg, out)
    return {"cfg": cfg, "out": out, "report": report, "seconds": time.perf_counter() - start}


def test_finetuned_rows_beside_the_paper_faithful_ones(full_run: dict[str, Any]) -> None:
    """Each DMRS row has a DMRS+FT twin over the same N latents, never worse on validation than its start,
    saved as a circuit that (categorical pixels) sums to one over a pixel's levels... checked via a marginal."""
    out, rows = full_run["out"], full_run["report"]["models"]
    for leaf in ("gaussian", "categorical"):
        plain = {r["requested_N"]: r for r in rows if r["leaf"] == leaf and r["family"] == "DMRS"}
        tuned = {r["requested_N"]: r for r in rows if r["leaf"] == leaf and r["family"] == "DMRS+FT"}
        assert plain and tuned.keys() == plain.keys()
        for n, r in tuned.items():
            assert r["N"] == plain[n]["N"] and r["name"] == plain[n]["name"] + "+FT"
            ft = r["finetune"]
            assert ft["best_val_log_prob"] >= ft["start_val_log_prob"] and ft["epochs_run"] >= 1
            assert {"test_bpd_median", "test_bpd_p99", "test_bpd_max"} <= r.keys()
            circuit = MixtureCircuit.load(out / r["circuit_file"])
            assert circuit.meta["finetune"]["best_epoch"] == ft["best_epoch"]
            assert not (out / r["circuit_file"]).with_suffix(".pt").exists(), "the fine-tuning checkpoint was kept"
            if leaf == "categorical":  # the marginal of nothing observed is log 1 = 0: a normalized circuit
                x = torch.zeros(2, circuit.num_variables)
                lp = circuit.log_prob(x, mask=torch.zeros_like(x, dtype=torch.bool))
                assert torch.allclose(lp.double(), torch.zeros(2, dtype=torch.float64), atol=1e-5)


def test_report_rows(full_run: dict[str, Any]) -> None:
    out, report = full_run["out"], full_run["report"]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["models"] == report["models"]
    assert isinstance(on_disk["wall_seconds"], (int, float)) and on_disk["wall_seconds"] > 0
    rows = on_disk["models"]
    assert isinstance(rows, list) and rows
    for row in rows:
        assert {"name", "selection", "N", "test_bpd", "num_params"} <= row.keys(), row
        assert math.isfinite(row["test_bpd"]) and row["test_bpd"] > 0, row
        assert row["N"] >= 1 and row["num_params"] >= 1, row
    for leaf in ("gaussian", "categorical"):
        mine = [r for r in rows if r["leaf"] == leaf]
        assert {r["selection"] for r in mine} == set(STRATEGIES) | {"einet", "cm"}
        exm = [r for r in mine if r["selection"] == "exhaustive"]
        assert len(exm) == 1 and exm[0]["N"] == 4**4  # the whole latent space
        for r in mine:
            if r["selection"] in ("sample", "topk"):
                assert r["N"] == r["requested_N"] and r["N"] in (10, 32)
                assert r["name"].startswith(DM_FAMILIES[r["selection"]])


def test_gaussian_rows_carry_their_discrete_bpd(full_run: dict[str, Any]) -> None:
    """Every Gaussian row (circuits, +EM, +FT, CM, EiNet) has the discrete BPD of its twin, below its
    dequantized BPD; the report shows the column. Categorical rows are discrete already."""
    rows = full_run["report"]["models"]
    for r in rows:
        if r["leaf"] == "gaussian":
            assert 0 < r["test_bpd_discrete"] < r["test_bpd"], r["name"]
        else:
            assert "test_bpd_discrete" not in r, r["name"]
    assert "discrete BPD" in (full_run["out"] / "report.md").read_text()


@pytest.mark.parametrize("leaf", ["gaussian", "categorical"])
def test_exm_bpd_recomputed_from_saved_circuit(full_run: dict[str, Any], leaf: str) -> None:
    """The reported ExM test BPD is that of the saved circuit file, recomputed independently."""
    cfg, out = full_run["cfg"], full_run["out"]
    row = next(r for r in full_run["report"]["models"] if r["leaf"] == leaf and r["selection"] == "exhaustive")
    circuit = MixtureCircuit.load(out / row["circuit_file"])
    assert len(circuit) == 256 and circuit.leaf.kind == leaf
    splits = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, limit=cfg.limit)
    bpd = test_bpd(
        circuit,
        splits.test_x,
        leaf,
        splits.levels,
        draws=cfg.experiments.bpd_draws,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    assert row["test_images"] == len(splits.test_x)
    assert bpd["mean"] == pytest.approx(row["test_bpd"], rel=0, abs=1e-9)


@pytest.mark.parametrize("leaf", ["gaussian", "categorical"])
def test_classification_experiment_of_the_class_aware_rows(full_run: dict[str, Any], leaf: str) -> None:
    section = full_run["report"]["experiments"][leaf]["classification"]
    families = {name.split(" (")[0] for name in section["circuit"]}
    assert {"ExM", "DMRS", "DMBS", "DMRS+FT"} <= families
    masks = {"full", "random 50%", "top", "bottom", "left", "right", "center"}
    for per in [*section["circuit"].values(), *section["cnn_circuit"].values(), section["cnn_mean"]]:
        assert set(per) == masks and all(0.0 <= m["accuracy"] <= 1.0 and m["ece"] >= 0.0 for m in per.values())
    assert section["images"] == 40 and section["hidden_fraction"]["left"] == 0.5
    prior_rows = [name for name in section["circuit"] if not name.endswith(FITTED)]
    assert set(section["class_fit"]) == {name + FITTED for name in prior_rows} and set(section["cnn_circuit"]) == set(
        prior_rows
    )
    alphas = full_run["cfg"].experiments.classification_fit_alphas
    assert all(f["alpha"] in alphas and f["iterations"] == 1 for f in section["class_fit"].values())
    for name in ("classification", "classification_calibration", "class_samples"):
        assert (full_run["out"] / "figures" / f"{leaf}-{name}.png").stat().st_size > 0
    assert "## Classification with missing pixels" in (full_run["out"] / "report.md").read_text()


def test_report_md_links_and_config(full_run: dict[str, Any]) -> None:
    out, cfg = full_run["out"], full_run["cfg"]
    md = (out / "report.md").read_text()
    links = re.findall(r"\]\(([^)\s]+\.png)\)", md)
    assert len(links) >= 7 * 2  # usage, 2 BPD plots, inpainting, samples, class balance, correlation; per leaf
    missing = [link for link in links if not (out / link).is_file()]
    assert not missing, missing
    report = json.loads((out / "report.json").read_text())
    figures = [p for section in report["experiments"].values() for p in section["figures"].values()]
    figures += [
        part["figure"]
        for section in report["experiments"].values()
        for part in section.values()
        if isinstance(part, dict) and "figure" in part
    ]
    assert figures and all((out / p).is_file() and not Path(p).is_absolute() for p in figures)  # movable folder
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["leaves"] == ["gaussian", "categorical"] and written["limit"] == LIMIT
    assert written["models"][0]["K"] == 4 and written["models"][0]["N"] == [10, 32]
    assert load_config(out / "config.yaml") == cfg  # the written config loads back to the same run


def test_rerun_skips_and_force_distill_recomputes(full_run: dict[str, Any]) -> None:
    cfg, out = full_run["cfg"], full_run["out"]
    checkpoints, circuits = mtimes(out, "**/*.pt"), mtimes(out, "*/*/circuits/*.safetensors")
    assert len(checkpoints) == 9 and len(circuits) == 2 * (
        8 + 2 + 2
    )  # 8 selections + 2 EM- and 2 fine-tuned DMRS per leaf
    start = time.perf_counter()
    again = run_pipeline(cfg, out)
    seconds = time.perf_counter() - start
    assert again["models"] == full_run["report"]["models"]
    assert mtimes(out, "**/*.pt") == checkpoints and mtimes(out, "*/*/circuits/*.safetensors") == circuits
    assert seconds < full_run["seconds"] / 3, (seconds, full_run["seconds"])

    forced = run_pipeline(cfg, out, force=["distill"])
    new = mtimes(out, "*/*/circuits/*.safetensors")
    assert new.keys() == circuits.keys() and all(new[k] > circuits[k] for k in circuits)
    assert mtimes(out, "**/*.pt") == checkpoints  # training is not redone
    assert [r["test_bpd"] for r in forced["models"]] == pytest.approx(
        [r["test_bpd"] for r in again["models"]], abs=1e-9
    )


class _Interrupt(Exception):
    """Stands for Ctrl-C after a checkpoint write."""


def test_interrupted_vqvae_training_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-epoch training interrupted after epoch 1 runs only epoch 2 on the re-run, ending where an
    uninterrupted run ends (the trainer restores weights, optimizer, shuffling RNG and noise step)."""
    cfg = tiny_config(["gaussian"], epochs=2, full=False)
    real_save, saves = train_module.save_checkpoint, []

    def interrupting_save(path: Any, kind: str, payload: dict[str, Any]) -> Path:
        written = real_save(path, kind, payload)
        if kind == "vqvae":
            raise _Interrupt(str(path))
        return written

    monkeypatch.setattr(train_module, "save_checkpoint", interrupting_save)
    with pytest.raises(_Interrupt):
        run_pipeline(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "gaussian" / "m" / "vqvae.pt"
    first = load_checkpoint(ckpt, "vqvae")["train_state"]
    assert first["epoch"] == 1 and not first["done"]

    def counting_save(path: Any, kind: str, payload: dict[str, Any]) -> Path:
        saves.append(kind)
        return real_save(path, kind, payload)

    monkeypatch.setattr(train_module, "save_checkpoint", counting_save)
    report = run_pipeline(cfg, tmp_path / "run")
    assert saves.count("vqvae") == 1  # one more epoch, not a restart from scratch
    resumed = load_checkpoint(ckpt, "vqvae")
    assert resumed["train_state"]["epoch"] == 2 and report["sources"][0]["vqvae_epochs"] == 2
    assert resumed["train_state"]["history"][0] == first["history"][0]

    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    run_pipeline(cfg, tmp_path / "straight")
    straight = load_checkpoint(tmp_path / "straight" / "gaussian" / "m" / "vqvae.pt", "vqvae")
    assert straight["train_state"]["history"] == resumed["train_state"]["history"]
    for name, tensor in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][name], tensor, rtol=0, atol=0, msg=name)


def test_raising_epochs_continues_training(tmp_path: Path) -> None:
    run_pipeline(tiny_config(["gaussian"], epochs=1, full=False), tmp_path)
    ckpt = tmp_path / "gaussian" / "m" / "vqvae.pt"
    assert load_checkpoint(ckpt, "vqvae")["train_state"]["epoch"] == 1
    report = run_pipeline(tiny_config(["gaussian"], epochs=2, full=False), tmp_path)
    assert load_checkpoint(ckpt, "vqvae")["train_state"]["epoch"] == 2
    assert report["sources"][0]["vqvae_epochs"] == 2


def test_force_vqvae_redoes_downstream_stages(tmp_path: Path) -> None:
    run_pipeline(tiny_config(["gaussian"], epochs=1, full=False), tmp_path)
    before = mtimes(tmp_path, "gaussian/m/*.pt") | mtimes(tmp_path, "gaussian/m/circuits/*.safetensors")
    run_pipeline(tiny_config(["gaussian"], epochs=2, full=False), tmp_path, force=["vqvae"])
    after = mtimes(tmp_path, "gaussian/m/*.pt") | mtimes(tmp_path, "gaussian/m/circuits/*.safetensors")
    assert load_checkpoint(tmp_path / "gaussian" / "m" / "vqvae.pt", "vqvae")["train_state"]["epoch"] == 2
    stale = [name for name in before if after[name] == before[name]]
    assert not stale, f"outputs of the old VQ-VAE kept: {stale}"


def test_beam_with_n_below_classes_is_skipped_not_fatal(tmp_path: Path) -> None:
    cfg = tiny_config(["gaussian"], N=[8, 32], full=False)
    cfg = dataclasses.replace(cfg, models=[dataclasses.replace(cfg.models[0], strategies=["beam", "topk"])])
    report = run_pipeline(cfg, tmp_path)
    made = {(r["selection"], r["requested_N"]) for r in report["models"]}
    assert made == {("beam", 32), ("topk", 8), ("topk", 32)}  # beam N=8 < C=10: no row ...
    assert any("DMBS m N=8" in n and "skipped" in n for n in report["notes"])  # ... and a note says why
    assert not (tmp_path / "gaussian" / "m" / "circuits" / "beam-N8.safetensors").exists()


def test_extra_n_adds_rows_for_its_strategy_only(tmp_path: Path) -> None:
    cfg = tiny_config(["gaussian"], N=[4], full=False)
    cfg = dataclasses.replace(
        cfg, models=[dataclasses.replace(cfg.models[0], strategies=["sample", "topk"], extra_N={"sample": [16, 4]})]
    )
    report = run_pipeline(cfg, tmp_path)
    made = sorted((r["selection"], r["requested_N"]) for r in report["models"] if r["family"] in ("DMRS", "TopK"))
    assert made == [("sample", 4), ("sample", 16), ("topk", 4)]  # 4 twice is one row


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    ckpt = tmp_path / "gaussian" / "m" / "vqvae.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"this is not a torch checkpoint")
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt))) as info:
        run_pipeline(tiny_config(["gaussian"], full=False), tmp_path)
    assert isinstance(info.value, ValueError)


def test_std_floor_reaches_every_circuit_and_names_its_rows(tmp_path: Path) -> None:
    cfg = tiny_config(["gaussian"], full=False)
    model = dataclasses.replace(cfg.models[0], strategies=["exhaustive", "topk"], std_floor=0.05)
    cfg = dataclasses.replace(
        cfg,
        models=[model],
        experiments=dataclasses.replace(
            cfg.experiments, inpainting=True, inpainting_images=2, inpainting_eval_images=5
        ),
    )
    report = run_pipeline(cfg, tmp_path)
    rows = [r for r in report["models"] if r["selection"] in ("exhaustive", "topk")]
    assert rows and all(r["std_floor"] == 0.05 and r["name"].endswith("σ≥0.05") for r in rows)
    files = sorted((tmp_path / "gaussian" / "m" / "circuits").glob("*.safetensors"))
    assert files and all("-floor0.05" in f.name for f in files)
    for f in files:
        circuit = MixtureCircuit.load(f)
        assert circuit.meta["std_floor"] == 0.05 and float(circuit.leaf.scale.min()) >= 0.05
    assert report["experiments"]["gaussian"]["inpainting"]  # the showcase parses floored keys


def test_a_transformer_twin_shares_the_vqvae_and_is_compared(tmp_path: Path) -> None:
    """`vqvae_from` reuses the VQ-VAE (same codes, not retrained); rows name their prior and selection time."""
    cfg = tiny_config(["gaussian"], N=[12], full=False)
    model = dataclasses.replace(cfg.models[0], strategies=["sample", "beam"])
    twin = dataclasses.replace(model, name="m-tf", vqvae_from="m", prior="transformer", prior_hidden=8, prior_heads=2)
    report = run_pipeline(dataclasses.replace(cfg, models=[model, twin]), tmp_path)
    assert not (tmp_path / "gaussian" / "m-tf" / "vqvae.pt").exists()
    assert (tmp_path / "gaussian" / "m-tf" / "prior-transformer.pt").is_file()
    src = {s["model"]: s for s in report["sources"]}
    assert (src["m"]["prior"], src["m-tf"]["prior"]) == ("pixelcnn", "transformer")
    assert src["m"]["vqvae_val_loss"] == src["m-tf"]["vqvae_val_loss"]
    assert src["m"]["distinct_train_codes"] == src["m-tf"]["distinct_train_codes"]
    rows = [r for r in report["models"] if r.get("model") == "m-tf"]
    assert {r["selection"] for r in rows} == {"sample", "beam"}
    assert all(r["prior"] == "transformer" and r["selection_seconds"] >= 0 for r in rows)
    assert any(n.startswith("[gaussian] priors compared: m (pixelcnn") for n in report["notes"])
    assert "| transformer |" in (tmp_path / "report.md").read_text()


def test_a_selection_shortfall_is_a_note_not_a_failed_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vq2pc.pipeline.models as models
    from vq2pc.latents.selection import SelectionShortfall

    real_select = models.select

    def short_of_32(prior: Any, strategy: str, N: int, **kw: Any) -> Any:
        if strategy == "sample" and N == 32:
            raise SelectionShortfall("sample: only 20 distinct latents in 9000 draws, N=32 requested")
        return real_select(prior, strategy, N, **kw)

    monkeypatch.setattr(models, "select", short_of_32)
    cfg = tiny_config(["gaussian"], full=False)
    cfg = dataclasses.replace(
        cfg, models=[dataclasses.replace(cfg.models[0], strategies=["sample", "topk"], N=[8, 32])]
    )
    report = run_pipeline(cfg, tmp_path)
    made = {(r["selection"], r["N"]) for r in report["models"]}
    assert ("sample", 8) in made and ("topk", 32) in made and ("sample", 32) not in made
    assert any("DMRS m N=32" in n and "only 20 distinct latents" in n for n in report["notes"])
    assert "only 20 distinct latents" in (tmp_path / "report.md").read_text()
    calls: list[int] = []
    monkeypatch.setattr(models, "select", lambda *a, **kw: calls.append(1) or short_of_32(*a, **kw))
    again = run_pipeline(cfg, tmp_path)  # the skip is remembered: no selection runs again
    assert calls == [] and again["notes"] == report["notes"]
