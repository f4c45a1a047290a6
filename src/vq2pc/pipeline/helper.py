"""The second process of ``vq2pc run --jobs 2``: it trains the baselines, then shares the +FT rows.

The baselines read only the data, so they train while the first process trains the VQ-VAE and prior
and distills (the torch threads are split between the two). Once they are done, the second process
helps with the +FT rows: for each source model the first process posts its rows, largest N first, and
each process takes the next row no one has taken. Both write into the same run folder; the first
process then reads the rows the second one cached. While rows are shared both processes run with the
same number of torch threads, so a row's numbers do not depend on which process computed it.
"""

from __future__ import annotations

import multiprocessing
import queue
import time
import traceback
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from vq2pc.data.datasets import DataSplits, load_dataset
from vq2pc.pipeline.baselines import run_baselines
from vq2pc.pipeline.config import RunConfig
from vq2pc.pipeline.finetune import FTJob, ft_row
from vq2pc.pipeline.models import SourceModel, build_source_model
from vq2pc.pipeline.rundir import Models, RunDir

__all__ = ["HelperProcess"]


@dataclass
class _Channels:
    """What the two processes share: posted rows, reports of rows done, and the claim counter."""

    tasks: Any  # Queue of (batch, leaf, model name, FT jobs, selections) or None (stop)
    reports: Any  # Queue of (batch, row index, result files the second process wrote)
    baselines_done: Any  # Event
    batch: Any  # Value: the batch whose rows are being claimed
    next: Any  # Value: the index of its next unclaimed row (its lock guards both)

    def take(self, batch: int, size: int) -> int | None:
        """Claim the next row of ``batch`` (``size`` rows); None once they are all claimed or it is over."""
        with self.next.get_lock():
            if self.batch.value != batch or self.next.value >= size:
                return None
            self.next.value += 1
            return self.next.value - 1


class HelperProcess:
    """The spawned second process (output in ``<run>/helper.log``) with half of this process's threads."""

    def __init__(self, cfg: RunConfig, run: RunDir) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.log, self.threads = run.root / "helper.log", torch.get_num_threads()
        self.share = max(1, self.threads // 2)
        self.ch = _Channels(ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("q", -1, lock=False), ctx.Value("q", 0))
        self.batches, self.joined = 0, False
        self.process = ctx.Process(
            target=_helper_job,
            name="vq2pc-helper",
            daemon=True,
            args=(cfg, str(run.root), sorted(run.force), self.share, str(self.log), self.ch),
        )
        self.process.start()
        torch.set_num_threads(self._own_threads())

    def _own_threads(self) -> int:
        return self.threads if self.joined else max(1, self.threads - self.share)

    def _check(self) -> None:
        if not self.process.is_alive():
            raise RuntimeError(
                f"the second process failed (exit code {self.process.exitcode}); its output is in {self.log}"
            )

    def wait_baselines(self, run: RunDir) -> None:
        """Wait until the baselines are trained (once); they were redone there, so ``run`` no longer forces them."""
        while not self.joined and not self.ch.baselines_done.wait(timeout=2):
            self._check()
        if not self.joined:
            self.joined = True
            torch.set_num_threads(self._own_threads())
            run.done_elsewhere("baselines")

    def share_rows(self, run: RunDir, src: SourceModel, jobs: list[FTJob], compute: Callable[[FTJob], Any]) -> int:
        """``compute`` each of ``jobs`` here or have the second process compute it (once its baselines are
        done); returns how many it computed. Its results are then in ``run``'s cache, marked as redone."""
        self._check()
        self.batches += 1
        b, order = self.batches, sorted(jobs, key=lambda job: -job.row.requested_N)
        with self.ch.next.get_lock():
            self.ch.batch.value, self.ch.next.value = b, 0
        wanted = {(job.row.selection, job.row.requested_N) for job in order}
        self.ch.tasks.put((b, src.leaf, src.spec.name, order, {k: v for k, v in src.selections.items() if k in wanted}))
        torch.set_num_threads(self.share)
        try:
            mine = []
            while (i := self.ch.take(b, len(order))) is not None:
                compute(order[i])
                mine.append(i)
            self._collect(run, b, set(range(len(order))) - set(mine))
        finally:
            torch.set_num_threads(self._own_threads())
        return len(order) - len(mine)

    def _collect(self, run: RunDir, batch: int, waiting: set[int]) -> None:
        while waiting:
            try:
                b, i, files = self.ch.reports.get(timeout=2)
            except queue.Empty:
                self._check()
                continue
            if b == batch:
                waiting.discard(i)
                run.redone.update(map(Path, files))

    def close(self) -> None:
        """Tell it to stop once this process needs nothing more, and wait for it."""
        if self.process.is_alive():
            self.ch.tasks.put(None)
            self.process.join(timeout=60)
        self.stop()

    def stop(self) -> None:
        """End it if it still runs (this process failed or was interrupted); its finished files stay."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        torch.set_num_threads(self.threads)


def _helper_job(cfg: RunConfig, root: str, force: list[str], threads: int, log: str, ch: _Channels) -> None:
    torch.set_num_threads(threads)
    with open(log, "a", encoding="utf-8") as out, redirect_stdout(out), redirect_stderr(out):
        try:
            quiet = {
                k: replace(getattr(cfg, k), progress=False) for k in ("vqvae_train", "prior_train", "baseline_train")
            }
            models = [replace(m, finetune=replace(m.finetune, progress=False)) for m in cfg.models]
            cfg = replace(cfg, **quiet, models=models)
            splits = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, limit=cfg.limit)
            run = RunDir(Path(root), set(force))
            for leaf in cfg.leaves:
                run_baselines(run, cfg, splits, leaf, [])
                print(f"[vq2pc helper] {leaf} baselines: done", flush=True)
            ch.baselines_done.set()
            run.force = {"distill"} if run.forced("distill") else set()  # the first process made the source models
            _serve_rows(cfg, run, splits, ch)
        except BaseException:  # the trace goes to the log; the first process reports the failure in one line
            traceback.print_exc()
            raise SystemExit(1) from None


def _serve_rows(cfg: RunConfig, run: RunDir, splits: DataSplits, ch: _Channels) -> None:
    """Take posted +FT rows until told to stop; each one's result files are reported back."""
    sources: dict[tuple[str, str], SourceModel] = {}
    while (task := ch.tasks.get()) is not None:
        batch, leaf, name, jobs, selections = task
        while (i := ch.take(batch, len(jobs))) is not None:
            if (leaf, name) not in sources:  # loaded from the first process's checkpoints
                spec = next(m for m in cfg.models if m.name == name)
                sources[leaf, name] = build_source_model(run, cfg, splits, leaf, spec)
            src = sources[leaf, name]
            src.selections.update(selections)  # the first process's, so that both fine-tune the same latents
            before, start = set(run.redone), time.perf_counter()
            row = ft_row(run, cfg, splits, src, jobs[i], Models(cfg.device))
            print(f"[vq2pc helper] {row.name} N={row.N}: {time.perf_counter() - start:.0f} s", flush=True)
            ch.reports.put((batch, i, [str(p) for p in run.redone - before]))
