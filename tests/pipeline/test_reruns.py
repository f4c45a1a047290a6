"""Re-runs of a run folder: a changed setting redoes only the stages that read it, a changed data record or
seed redoes everything, a copied folder is reused; ``jobs=2`` trains the baselines in a second process."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import LIMIT, mtimes, tiny_config

from vq2pc.circuit import MixtureCircuit
from vq2pc.pipeline import run_pipeline


@pytest.mark.slow
def test_a_changed_setting_recomputes_only_what_reads_it(tmp_path: Path) -> None:
    cfg = tiny_config(["gaussian"], full=False)
    model = dataclasses.replace(cfg.models[0], strategies=["sample", "topk"], N=[8])
    cfg = dataclasses.replace(cfg, models=[model])
    first = run_pipeline(cfg, tmp_path)
    circuits = mtimes(tmp_path, "gaussian/m/circuits/*.safetensors")
    checkpoints = mtimes(tmp_path, "gaussian/m/*.pt")
    prior_weighted = dataclasses.replace(cfg, models=[dataclasses.replace(model, weights="prior")])
    second = run_pipeline(prior_weighted, tmp_path)
    assert mtimes(tmp_path, "gaussian/m/*.pt") == checkpoints  # training does not read `weights`
    now = mtimes(tmp_path, "gaussian/m/circuits/*.safetensors")
    assert now.keys() == circuits.keys() and all(now[k] > circuits[k] for k in circuits)  # the circuits do
    loaded = MixtureCircuit.load(tmp_path / "gaussian" / "m" / "circuits" / "sample-N8.safetensors")
    assert loaded.meta["weights"] == "prior"
    rows = {r["name"]: r["test_bpd"] for r in second["models"]}
    assert rows.keys() == {r["name"] for r in first["models"]}
    third = run_pipeline(prior_weighted, tmp_path)  # nothing changed: everything reused
    assert mtimes(tmp_path, "gaussian/m/circuits/*.safetensors") == now and third["models"] == second["models"]


@pytest.mark.slow
def test_beam_score_and_search_recompute_only_the_dmbs_rows(tmp_path: Path) -> None:
    """``beam_score`` and ``beam_search`` reach the selection and the row; switching either redoes DMBS and its
    +FT twin only, and a folder made with the class-marginal score (the only one before the option) is reused
    under ``marginal``."""
    cfg = tiny_config(["gaussian"], full=False)
    model = dataclasses.replace(
        cfg.models[0],
        strategies=["sample", "beam"],
        N=[20],
        starts=1,
        ft_strategies=["beam"],
        beam_score="marginal",
        finetune=dataclasses.replace(cfg.models[0].finetune, epochs=1),
    )
    cfg = dataclasses.replace(cfg, models=[model])
    first = run_pipeline(cfg, tmp_path)
    before = mtimes(tmp_path, "gaussian/m/circuits/*.safetensors")
    assert run_pipeline(cfg, tmp_path)["models"] == first["models"]
    assert mtimes(tmp_path, "gaussian/m/circuits/*.safetensors") == before
    literal = dataclasses.replace(cfg, models=[dataclasses.replace(model, beam_score="class")])
    second = run_pipeline(literal, tmp_path)
    now = mtimes(tmp_path, "gaussian/m/circuits/*.safetensors")
    assert all(now[k] == before[k] for k in now if "/sample-" in k)
    assert all(now[k] > before[k] for k in now if "/beam-" in k)
    scores = {r["name"]: r.get("beam_score") for r in second["models"]}
    assert scores["DMBS m"] == scores["DMBS m+FT"] == "class" and scores["DMRS m"] is None
    sampled = dataclasses.replace(literal, models=[dataclasses.replace(literal.models[0], beam_search="stochastic")])
    third = run_pipeline(sampled, tmp_path)
    last = mtimes(tmp_path, "gaussian/m/circuits/*.safetensors")
    assert all(last[k] == now[k] for k in last if "/sample-" in k) and all(
        last[k] > now[k] for k in last if "/beam-" in k
    )
    searches = {r["name"]: r.get("beam_search") for r in third["models"]}
    assert searches["DMBS m (stochastic)"] == searches["DMBS m (stochastic)+FT"] == "stochastic"
    assert searches["DMRS m"] is None


@pytest.mark.slow
def test_ft_std_max_adds_capped_ft_rows_beside_the_uncapped_ones(tmp_path: Path) -> None:
    """``ft_std_max`` adds a "+FT σ<c" row per cap and selection at ``ft_std_max_N``, reusing every row that was
    there; its circuit's stds are all below c, and the report pairs it with its paper-faithful twin."""
    cfg = tiny_config(["gaussian"], full=False)
    model = dataclasses.replace(
        cfg.models[0],
        strategies=["sample"],
        N=[10, 20],
        ft_strategies=["sample"],
        finetune=dataclasses.replace(cfg.models[0].finetune, epochs=1),
    )
    cfg = dataclasses.replace(cfg, models=[model])
    run_pipeline(cfg, tmp_path)
    before = mtimes(tmp_path, "gaussian/m/circuits/*.safetensors")
    capped = dataclasses.replace(model, ft_std_max=[0.05], ft_std_max_N=[20])  # N = 10 gets no capped row
    out = run_pipeline(dataclasses.replace(cfg, models=[capped]), tmp_path)
    now = mtimes(tmp_path, "gaussian/m/circuits/*.safetensors")
    assert all(now[k] == before[k] for k in before)
    assert set(now) - set(before) == {"gaussian/m/circuits/sample-N20-ft-cap0.05.safetensors"}
    rows = {r["name"]: r for r in out["models"]}
    row = rows["DMRS m+FT σ<0.05"]
    assert row["family"] == "DMRS+FT σ<0.05" and row["finetune"]["std_max"] == 0.05 and "DMRS m+FT" in rows
    assert float(MixtureCircuit.load(tmp_path / row["circuit_file"]).leaf.scale.max()) < 0.05
    assert any(
        n.startswith("[gaussian] fine-tuned distillation σ<0.05 (beyond the paper) of DMRS m N=") for n in out["notes"]
    )


def test_settings_key_leaves_out_dropped_settings_only() -> None:
    from vq2pc.models.train import TrainConfig
    from vq2pc.pipeline.rundir import settings_key

    key = settings_key(TrainConfig(), drop=("progress",))
    assert "progress" not in key and key["amp"] is None and key["lr"] == TrainConfig().lr
    assert key.keys() == {f.name for f in dataclasses.fields(TrainConfig)} - {"progress"}


def test_a_folder_of_another_cache_schema_is_refused_until_forced(tmp_path: Path) -> None:
    """A run folder stamped before cache schemas existed (no "cache_schema" in data.json) is refused with one
    message naming both ways out; --force all recomputes it, and the stamp then holds this schema."""
    from vq2pc.data.datasets import load_dataset
    from vq2pc.pipeline.orchestrate import _check_data, run_pipeline
    from vq2pc.pipeline.rundir import CACHE_SCHEMA, RunDir

    cfg = tiny_config(["gaussian"], full=False)
    splits = load_dataset(cfg.dataset, seed=cfg.seed, limit=cfg.limit)
    old = {"dataset": cfg.dataset, "seed": cfg.seed, "limit": cfg.limit, "splits_sha256": splits.fingerprint()}
    (tmp_path / "data.json").write_text(json.dumps(old))
    with pytest.raises(
        ValueError,
        match=r"cache schema 1, this one reads 2\): run into a new folder, or pass "
        r"--force all",
    ):
        run_pipeline(cfg, tmp_path)
    assert not (tmp_path / "gaussian").exists(), "a refused folder was written to"
    run = RunDir(tmp_path, {"all"})
    assert _check_data(run, cfg, splits, print) == {**old, "cache_schema": CACHE_SCHEMA}
    (tmp_path / "data.json").write_text(json.dumps({**old, "cache_schema": CACHE_SCHEMA}))
    _check_data(RunDir(tmp_path), cfg, splits, print)  # this schema: reused


@pytest.mark.slow
def test_cm_batch_size_trains_the_cm_alone_with_its_own_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``baselines.cm_batch_size`` reaches the CM's training; the EiNet keeps ``baseline_train``'s batch."""
    import vq2pc.pipeline.baselines as stage

    seen: dict[str, int] = {}
    for name in ("train_cm", "train_einet"):

        def spy(
            splits: Any,
            model_cfg: Any,
            train: Any,
            checkpoint: Any = None,
            _real: Any = getattr(stage, name),  # noqa: B008 (binds this stage)
            _name: str = name,
        ) -> Any:
            seen[_name] = train.batch_size
            return _real(splits, model_cfg, train, checkpoint=checkpoint)

        monkeypatch.setattr(stage, name, spy)
    cfg = tiny_config(["gaussian"], full=False)
    cfg = dataclasses.replace(cfg, baselines=dataclasses.replace(cfg.baselines, cm=True, einet=True, cm_batch_size=16))
    run_pipeline(cfg, tmp_path)
    assert (
        seen == {"train_cm": 16, "train_einet": cfg.baseline_train.batch_size} and cfg.baseline_train.batch_size != 16
    )


@pytest.mark.slow
def test_cm_recipe_paper_trains_and_compiles_its_own_grid(tmp_path: Path) -> None:
    """``baselines.cm_recipe: paper`` reaches the CM: its checkpoint is the paper recipe over a grid of
    ``cm_points`` seeded by the run, and the report's CM row is that grid's circuit."""
    from vq2pc.baselines.cm import ContinuousMixture

    cfg = tiny_config(["gaussian"], full=False)
    cfg = dataclasses.replace(
        cfg,
        seed=3,
        baselines=dataclasses.replace(
            cfg.baselines, cm=True, einet=False, cm_recipe="paper", cm_channels=4, cm_refresh=2
        ),
    )
    out = run_pipeline(cfg, tmp_path)
    row = next(r for r in out["models"] if r["family"] == "CM")
    model = ContinuousMixture.load((tmp_path / row["circuit_file"]).with_name("cm.pt"))
    circuit = MixtureCircuit.load(tmp_path / row["circuit_file"])
    assert row["recipe"] == "paper" and row["N"] == len(circuit) == 64 and circuit.meta["recipe"] == "paper"
    assert (model.cfg.recipe, model.cfg.points, model.cfg.grid_seed, model.cfg.channels) == ("paper", 64, 3, 4)
    assert row["source_params"] == model.num_params


@pytest.mark.slow
def test_two_jobs_train_the_baselines_beside_and_give_the_same_report(tmp_path: Path) -> None:
    """``jobs=2``: the baselines train in a second process (its log in the run folder), which then shares the
    +FT rows; the first process reads their cached results; every row equals the one-process run's (up to
    thread-count float noise)."""
    cfg = tiny_config(["gaussian"], full=False)
    model = dataclasses.replace(cfg.models[0], strategies=["sample"], ft_strategies=["sample"], N=[4, 8])
    cfg = dataclasses.replace(cfg, models=[model], baselines=dataclasses.replace(cfg.baselines, einet=True, cm=True))
    one = run_pipeline(cfg, tmp_path / "one")
    two = run_pipeline(cfg, tmp_path / "two", jobs=2)
    assert "[vq2pc helper] gaussian baselines: done" in (tmp_path / "two" / "helper.log").read_text()
    assert [r["name"] for r in two["models"]] == [r["name"] for r in one["models"]]
    assert {"EiNet", "CM", "DMRS+FT"} <= {r["family"] for r in two["models"]}
    for a, b in zip(one["models"], two["models"]):
        assert math.isclose(a["test_bpd"], b["test_bpd"], rel_tol=1e-4), a["name"]
    before = mtimes(tmp_path / "two", "gaussian/baselines/*.pt")
    again = run_pipeline(cfg, tmp_path / "two", force=["baselines"], jobs=2)  # redone there once, not twice here
    after = mtimes(tmp_path / "two", "gaussian/baselines/*.pt")
    assert before and before.keys() == after.keys() and all(before[k] < after[k] for k in after)
    assert (tmp_path / "two" / "helper.log").read_text().count("gaussian baselines: done") == 2
    for a, b in zip(two["models"], again["models"], strict=True):
        assert math.isclose(a["test_bpd"], b["test_bpd"], rel_tol=1e-6), a["name"]


@pytest.mark.slow
def test_the_second_process_fine_tunes_the_rows_it_takes(tmp_path: Path) -> None:
    """Row sharing: while this process works on its first row, the second one takes the other, fine-tunes it
    (forced: really computed there) and reports it; this process then reads it instead of computing it."""
    import torch

    from vq2pc.data.datasets import load_dataset
    from vq2pc.pipeline.distill import distill_all
    from vq2pc.pipeline.finetune import finetune_all, ft_row, ft_sources
    from vq2pc.pipeline.helper import HelperProcess
    from vq2pc.pipeline.models import build_source_model
    from vq2pc.pipeline.rundir import RunDir

    cfg = tiny_config(["gaussian"], full=False)
    model = dataclasses.replace(cfg.models[0], strategies=["sample"], ft_strategies=["sample"], N=[4, 8])
    cfg = dataclasses.replace(cfg, models=[model])
    first = {r["name"] + str(r["N"]): r["test_bpd"] for r in run_pipeline(cfg, tmp_path)["models"]}
    threads = torch.get_num_threads()
    run = RunDir(tmp_path, {"distill"})
    splits = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, limit=cfg.limit)
    src = build_source_model(run, cfg, splits, "gaussian", cfg.models[0])
    rows, circuits = distill_all(run, cfg, splits, src, [])
    helper = HelperProcess(cfg, run)
    try:
        helper.wait_baselines(run)
        start = time.time_ns()

        def slow(job: Any) -> None:  # hold the first row until the second process took the other
            deadline = time.monotonic() + 120
            while helper.ch.next.value < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            ft_row(run, cfg, splits, src, job, circuits)

        assert helper.share_rows(run, src, ft_sources(src, rows), slow) == 1
        log = (tmp_path / "helper.log").read_text()
        assert "[vq2pc helper] DMRS m+FT N=" in log
        ft = finetune_all(run, cfg, splits, src, rows, circuits)  # both read from the cache now
        assert all(p.stat().st_mtime_ns > start for p in (tmp_path / "gaussian" / "m" / "circuits").glob("*-ft.*"))
        for row in ft:
            assert math.isclose(row.test_bpd, first[row.name + str(row.N)], rel_tol=1e-4), row.name
        helper.close()
        assert helper.process.exitcode == 0
    finally:
        helper.stop()
    assert torch.get_num_threads() == threads


@pytest.mark.slow
def test_a_failed_second_process_is_one_clear_error(tmp_path: Path) -> None:
    """When the second process fails, the first one raises one error that names its log (the trace is there)."""
    from vq2pc.pipeline.helper import HelperProcess
    from vq2pc.pipeline.rundir import RunDir

    cfg = tiny_config(["gaussian"], full=False)
    object.__setattr__(cfg, "dataset", "no-such-dataset")  # past validation: the second process must fail itself
    run = RunDir(tmp_path)
    helper = HelperProcess(cfg, run)
    try:
        with pytest.raises(
            RuntimeError, match=r"the second process failed \(exit code 1\); its output is in .*helper.log"
        ):
            helper.wait_baselines(run)
        with pytest.raises(RuntimeError, match="the second process failed"):
            helper.share_rows(run, None, [], print)  # type: ignore[arg-type]
    finally:
        helper.stop()
    assert "Traceback" in (tmp_path / "helper.log").read_text()


def test_two_jobs_are_refused_where_they_make_no_sense(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="jobs must be 1 or 2"):
        run_pipeline(tiny_config(["gaussian"], full=False), tmp_path, jobs=3)


@pytest.mark.slow
def test_changed_data_or_seed_recomputes_and_a_copied_folder_is_reused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run folder remembers the data it was computed from by content (data.json): another --limit or
    --seed retrains everything; a copy of the folder (`cp -r`: new file times, in copy order) reuses everything."""
    import shutil

    cfg = tiny_config(["gaussian"], full=False)
    out = tmp_path / "run"
    first = run_pipeline(cfg, out)
    record = json.loads((out / "data.json").read_text())
    assert record["limit"] == LIMIT and len(record["splits_sha256"]) == 64
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, copy_function=shutil.copy)  # new modification times, in copy order
    time.sleep(0.01)
    before = mtimes(copy, "**/*.pt")
    again = run_pipeline(cfg, copy)
    assert mtimes(copy, "**/*.pt") == before and "every stage is recomputed" not in capsys.readouterr().out
    assert [r["test_bpd"] for r in again["models"]] == [r["test_bpd"] for r in first["models"]]
    changed = dataclasses.replace(cfg, models=[dataclasses.replace(cfg.models[0], weights="prior")])
    run_pipeline(
        changed, copy
    )  # a distillation setting: the circuits are redone (and the log says why), not the models
    assert mtimes(copy, "**/*.pt") == before and "recomputed, its settings changed" in capsys.readouterr().out
    for change in ({"limit": LIMIT - 30}, {"seed": 1}):
        changed = dataclasses.replace(cfg, **change)
        report = run_pipeline(changed, out)
        assert "every stage is recomputed" in capsys.readouterr().out
        assert mtimes(out, "**/*.pt") != before
        assert json.loads((out / "data.json").read_text())[next(iter(change))] == next(iter(change.values()))
        if "limit" in change:
            assert report["splits"]["train"] < first["splits"]["train"]
        before = mtimes(out, "**/*.pt")
