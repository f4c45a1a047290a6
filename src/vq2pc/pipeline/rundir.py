"""The run directory: where every stage writes, and how a re-run skips finished stages.

Layout (``<leaf>`` is gaussian/categorical/bernoulli, ``<model>`` a ModelSpec name)::

    config.yaml                              the resolved configuration
    <leaf>/<model>/vqvae.pt, prior.pt        training checkpoints (resume from here)
    <leaf>/<model>/circuits/<name>.safetensors   distilled circuits
    <leaf>/baselines/...                     EiNet / CM checkpoints and compiled CM circuit
    results/<leaf>/.../<stage>.json          the numbers of every finished stage (+ settings and input hashes)
    <file>.inputs.json                       SHA-256 of the files a checkpoint / compiled file was made from
    data.json                                the data every stage read: dataset, seed, limit, SHA-256 of splits
    figures/*.png                            every figure
    report.json, report.md                   the gathered results

Under ``torchrun`` every rank runs every stage and reads the same files (the run directory lies
on a filesystem they share); rank 0 alone writes or removes them, between barriers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core.distributed import barrier, is_main
from vq2pc.core.files import write_json

__all__ = ["RunDir", "Models", "STAGES", "CACHE_SCHEMA", "check_stages", "check_schema", "settings_key"]

_PARAMS = "_params"  # key of the settings a cached result was computed with
_INPUTS = "_inputs"  # key of the SHA-256 of the files a cached result was computed from

CACHE_SCHEMA = 2
"""Version of what the cache keys hold (the settings stored under ``_params``, stamped in ``data.json``). A key
holds every setting a stage reads; a change to what they hold bumps this version, and a run folder stamped with
another one is refused (:func:`check_schema`) instead of being recomputed piecemeal. 1: keys that left out
settings added later while unset."""

# Stage names accepted by --force.
STAGES = (
    "vqvae",
    "prior",
    "distill",
    "baselines",
    "usage",
    "inpainting",
    "samples",
    "correlation",
    "classification",
    "all",
)


@dataclass
class RunDir:
    """A run directory and the set of stages to redo even if their outputs exist."""

    root: Path
    force: set[str] = field(default_factory=set)
    redone: set[Path] = field(default_factory=set)  # outputs already redone in this process

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        check_stages(self.force)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "figures").mkdir(exist_ok=True)

    def forced(self, stage: str) -> bool:
        return stage in self.force or "all" in self.force

    def done_elsewhere(self, stage: str) -> None:
        """``stage`` was redone by another process of this invocation: it is no longer forced here."""
        stages = set(STAGES) - {"all"} if "all" in self.force else self.force
        self.force = set(stages) - {stage}

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def figure(self, name: str) -> Path:
        return self.path("figures", name)

    def checkpoint(
        self, stage: str, *parts: str, after: tuple[Path, ...] = (), params: dict[str, Any] | None = None
    ) -> Path:
        """Path of a training checkpoint, removed first (training restarts) when ``stage`` is forced
        or when a file it was trained from (``after``, e.g. the VQ-VAE for the prior) changed content,
        or the settings it was trained with (``params``, when given) changed."""
        p = self.path(*parts)
        stale = p.exists() and p not in self.redone and (self.forced(stage) or self._changed(after, p, params))
        if stale or not p.exists():
            write_json(_inputs_file(p), self._record(after, params))  # what this training starts from
        barrier()  # under torchrun: every rank decided on the same file before rank 0 removes it
        if stale:
            if is_main():
                p.unlink()
            self.redone.add(p)
        barrier()
        return p

    def discard(self, path: Path) -> None:
        """Remove a finished training's checkpoint and its record (rank 0; the file is not needed any more)."""
        if is_main():
            path.unlink(missing_ok=True)
            _inputs_file(path).unlink(missing_ok=True)

    def outdated(self, stage: str, path: Path, depends: tuple[Path, ...] = ()) -> bool:
        """Whether the output file ``path`` must be (re)made: missing, forced, or made from other contents
        of ``depends`` (then the caller remakes it from the current ones, recorded here)."""
        redo = not path.exists() or (self.forced(stage) and path not in self.redone) or self._changed(depends, path)
        if redo:
            write_json(_inputs_file(path), self._digests(depends))
        return redo

    def _changed(self, depends: tuple[Path, ...], target: Path, params: dict[str, Any] | None = None) -> bool:
        """Whether ``depends`` (or ``params``) differ from the contents ``target`` was made from (recorded
        beside it); a target without a record (a file put there by hand) falls back to file times."""
        try:
            recorded = json.loads(_inputs_file(target).read_text())
        except (OSError, ValueError):
            return _newer(depends, target)
        return recorded != self._record(depends, params)

    def _record(self, depends: tuple[Path, ...], params: dict[str, Any] | None) -> dict[str, Any]:
        """What a file records beside it: the digests of ``depends``, and ``params`` when given."""
        digests: dict[str, Any] = self._digests(depends)
        return digests if params is None else {**digests, _PARAMS: json.loads(json.dumps(params, sort_keys=True))}

    def _digests(self, paths: tuple[Path, ...]) -> dict[str, str | None]:
        """Contents of ``paths`` by their path in the run folder (a moved or copied folder stays valid)."""
        out = {}
        for p in map(Path, paths):
            try:
                name = p.resolve().relative_to(self.root.resolve()).as_posix()
            except ValueError:
                name = str(p)
            out[name] = _digest(p)
        return out

    def cached(
        self,
        stage: str,
        name: str,
        compute: Callable[[], dict[str, Any]],
        outputs: tuple[Path, ...] = (),
        depends: tuple[Path, ...] = (),
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Return ``results/<name>.json`` if it and ``outputs`` exist, the files in ``depends`` have the contents
        it was computed from, it was computed with the same ``params`` (the config values the stage reads) and ``stage`` is not
        forced; else compute it.

        ``compute`` writes ``outputs`` (files) itself and returns the numbers, which are written last, so a
        stage interrupted half-way is redone on the next run, and so is one whose inputs or settings changed.
        A result with a ``"skipped"`` entry (the stage could not be done, e.g. too few distinct latents)
        has no outputs and is reused like any other.
        """
        path = self.path("results", f"{name}.json")
        params = json.loads(json.dumps({"cache_schema": CACHE_SCHEMA, **(params or {})}, sort_keys=True))  # as read
        if path.exists() and not (self.forced(stage) and path not in self.redone):
            stored = json.loads(path.read_text())
            inputs = stored.pop(_INPUTS, None)
            same = inputs == self._digests(depends)
            done = stored.get("skipped") or all(Path(o).exists() for o in outputs)  # a skip has no outputs
            settled = stored.pop(_PARAMS, {}) == params
            if settled and done and same:
                return stored
            why = [
                w
                for w, ok in (("its settings", settled), ("its input files", same), ("its output files", done))
                if not ok
            ]
            if is_main():
                print(f"[vq2pc] {stage} {name}: recomputed, {' and '.join(why)} changed", flush=True)
        digests = self._digests(depends)  # the inputs this result is computed from
        result = compute()
        write_json(path, {**result, _PARAMS: params, _INPUTS: digests})
        self.redone.add(path)
        return result


class Models(Mapping[str, Any]):
    """Models by name, each loaded when read: the pipeline keeps circuit *files*, not their tensors.

    A categorical circuit holds N·S·L floats (3.3 GB at N = 4096 on MNIST). Loading one when a stage
    reads it, and dropping it after, bounds memory by the largest model instead of the sum of all of them.
    ``sizes`` holds each file's number of components without loading it."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.loaders: dict[str, Callable[[], Any]] = {}
        self.sizes: dict[str, int] = {}

    def add_file(self, name: str, path: Path, size: int) -> None:
        self.loaders[name] = partial(MixtureCircuit.load, path, device=self.device)
        self.sizes[name] = size

    def add_model(self, name: str, model: Any) -> None:
        """A model that stays in memory (an EiNet or a CM circuit the caller holds anyway)."""
        self.loaders[name] = lambda: model

    def __getitem__(self, name: str) -> Any:
        return self.loaders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self.loaders)

    def __len__(self) -> int:
        return len(self.loaders)


def settings_key(settings: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A dataclass's settings as part of a cache key: all of them but ``drop`` (settings that do not change results)."""
    return {k: v for k, v in asdict(settings).items() if k not in drop}


def check_schema(run: RunDir, stamp: dict[str, Any]) -> None:
    """Refuse a run folder whose stamp (``data.json``) has another :data:`CACHE_SCHEMA` (1 when it has none),
    unless every stage is forced: its cached results cannot be told valid or stale."""
    schema = stamp.get("cache_schema", 1)
    if schema != CACHE_SCHEMA and not run.forced("all"):
        raise ValueError(
            f"{run.root} holds results cached by another version of vq2pc (cache schema {schema}, "
            f"this one reads {CACHE_SCHEMA}): run into a new folder, or pass --force all to recompute "
            "everything in this one"
        )


def check_stages(names: Any) -> None:
    """Raise ``ValueError`` for a name in ``names`` that is not a stage."""
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        raise ValueError(f"--force: unknown stage(s) {unknown}; expected some of {list(STAGES)}")


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, mtime, size) -> sha256, so a process hashes a file once


def _digest(path: Path) -> str | None:
    """SHA-256 of a file's contents (None when it does not exist)."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _inputs_file(target: Path) -> Path:
    return target.with_name(target.name + ".inputs.json")


def _newer(sources: tuple[Path, ...], target: Path) -> bool:
    """Whether any existing file in ``sources`` was modified after ``target``."""
    mtime = target.stat().st_mtime_ns
    return any(Path(p).exists() and Path(p).stat().st_mtime_ns > mtime for p in sources)
