"""User mistakes through the real CLI: each is exit code != 0, ONE line on stderr naming the problem, no
traceback, and nothing new in the working folder (no run folder, no half-written file).

Most cases run in-process through ``vq2pc.cli.main`` (the same code path as the ``vq2pc`` script, a few ms
each); the ``SUBPROCESS`` ones run ``python -m vq2pc`` for real. Every case fails at argument, config or
input validation, before any training. The mistakes and what each prints (``vq2pc VERB: error: `` + ...):

run
  --device cuda (CPU-only torch)       --device cuda: CUDA is not available on this machine (torch …, a CPU-only
                                       build); use --device cpu
  --device gpu0 / cuda:x               --device 'gpu0' is not a torch device; use cpu, cuda, cuda:N or mps
  config K: "many"                     config.models[0].K must be an integer, got 'many'
  config N: ["16"]                     config.models[0].N[0] must be an integer, got '16'
  config vqvae_train.epochs: 1.5       config.vqvae_train.epochs must be an integer, got 1.5
  config prior_train.lr: -1            config.prior_train.lr must be > 0, got -1
  config latent_hw: [2]                config.models[0].latent_hw must have 2 items, got [2]
  config device: gpu0                  config.device: 'gpu0' is not a torch device; use cpu, cuda, cuda:N or mps
  config typo key                      config.models[0]: unknown key 'stratgies'; known: [...]
  config not YAML                      config bad.yaml is not valid YAML: ...
  --config missing.yaml                config file not found: missing.yaml
  --limit 0                            config.limit must be >= 1, got 0
  --seed -1                            --seed must be >= 0, got -1
  --out an existing file               cannot write junk.txt: it is a file, not a folder
  --out in an unwritable folder        cannot write /sys/run: Permission denied (/sys)
  --force bogus                        argument --force: invalid choice: 'bogus' (choose from ...) (see vq2pc run --help)
  dataset fails to load                the loader's message; no run folder is left behind
train-vqvae
  --epochs 0 / --batch-size 0          epochs must be >= 1, got 0 / batch_size must be >= 1, got 0
  --lr -1 / --patience -1              lr must be > 0, got -1.0 / patience must be >= 0, got -1
  --epochs 1.5                         argument --epochs: invalid int value: '1.5' (see vq2pc train-vqvae --help)
  --K 0                                K must be >= 1, got 0
  --grid 3 3 on 8x8 images             latent grid 3x3 is not reachable from a 8x8 image by halving; reachable grids: ...
  --quantizer-opt foo                  --quantizer-opt expects KEY=VALUE, got 'foo'
  --out under a file                   cannot write junk.txt/v.pt: junk.txt is a file, not a folder
  --device meta                        --device meta: device type 'meta' is not supported; use cpu, cuda, cuda:N or mps
train-prior
  --vqvae missing.pt                   checkpoint not found: missing.pt
  --vqvae a prior checkpoint           prior.pt is not a vq2pc vqvae checkpoint (format tag: 'vq2pc/prior')
distill
  prior of another K                   --prior (K=3, grid (2, 2)) does not match --vqvae (K=4, grid (2, 2))
  --components 0                       N must be a positive integer, got 0
  --starts 0 (beam)                    starts must be >= 1, got 0
  exhaustive above --max-space         latent space K^(HW) = 4^4 = 256 exceeds max_space = 10; raise max_space ...
  --std-min -1                         std_floor must be a positive finite number, got -1.0
  -N above the latent space            N=300 exceeds the latent space K^(HW)=256
evaluate
  --draws 0                            draws must be >= 1, got 0
  a checkpoint given as circuit        vq.pt is not a readable vq2pc circuit (corrupt, truncated or foreign): ...
usage
  a VQ-VAE given as --prior            vq.pt is not a vq2pc prior checkpoint (format tag: 'vq2pc/vqvae')
sample
  -n 0                                 n must be a positive number of samples, got 0
  --npy in an unwritable folder        cannot write /sys/s.npy: Permission denied (/sys)
  --image-shape 1 4 4 for S=64         image shape (1, 4, 4) does not have S=64 entries
  out of memory while drawing          out of memory: lower --num-samples (or use --device cpu)
inpaint
  --images missing.npy                 images file not found: missing.npy
  --images of the wrong shape          images have shape (4, 1, 3, 3); expected [n, 1, 8, 8]
  --images not a .npy                  cannot read images file junk.txt: not a numeric .npy array (...)
  --show 0                             --show must be >= 1 (images in the figure), got 0
refine
  --iterations -1                      iterations must be >= 0, got -1
  --batch-size 0                       batch_size must be >= 1, got 0
  --std-min 2                          max_std must be >= min_std=2.0, got 1.0
  a write refused deep inside          Permission denied: r.safetensors
export
  --format onnx                        argument --format: invalid choice: 'onnx' (choose from 'cirkit', 'npz') (...)
  --out in an unwritable folder        cannot write /sys/x.npz: Permission denied (/sys)
  an unexpected internal error         unexpected RuntimeError: boom (re-run with --debug for the traceback)

``--debug`` (before or after the verb) shows the traceback instead (checked here too).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import start_python

from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.cli import main
from vq2pc.core.leaves import Gaussian
from vq2pc.models.priors.pixelcnn import PixelCNNPrior, PriorConfig
from vq2pc.models.vqvae import VQVAE, VQVAEConfig


def _unwritable_folder() -> str | None:
    """A folder where nobody, root included, may create a file (Linux: /sys), else None."""
    try:
        with tempfile.NamedTemporaryFile(dir="/sys"):
            return None
    except OSError:
        return "/sys" if os.path.isdir("/sys") else None


UNWRITABLE = _unwritable_folder()
NO_CUDA = not torch.cuda.is_available()

YAML = {
    "k_many.yaml": "models:\n  - name: m\n    K: many\n",
    "n_strings.yaml": "models:\n  - name: m\n    N: ['16']\n",
    "epochs_float.yaml": "vqvae_train: {epochs: 1.5}\n",
    "lr_negative.yaml": "prior_train: {lr: -1}\n",
    "grid_short.yaml": "models:\n  - name: m\n    latent_hw: [2]\n",
    "device_bad.yaml": "device: gpu0\n",
    "typo.yaml": "models:\n  - name: m\n    stratgies: [beam]\n",
    "not_yaml.yaml": "models: [\n",
}

# (verb, arguments, text the one error line must contain)
CASES: list[tuple[str, str, str]] = [
    ("run", "--device gpu0 --out R", "'gpu0' is not a torch device"),
    ("run", "--device cuda:x --out R", "'cuda:x' is not a torch device"),
    ("run", "--config k_many.yaml --out R", "config.models[0].K must be an integer, got 'many'"),
    ("run", "--config n_strings.yaml --out R", "config.models[0].N[0] must be an integer, got '16'"),
    ("run", "--config epochs_float.yaml --out R", "config.vqvae_train.epochs must be an integer, got 1.5"),
    ("run", "--config lr_negative.yaml --out R", "config.prior_train.lr must be > 0, got -1"),
    ("run", "--config grid_short.yaml --out R", "config.models[0].latent_hw must have 2 items, got [2]"),
    ("run", "--config device_bad.yaml --out R", "config.device: 'gpu0' is not a torch device"),
    ("run", "--config typo.yaml --out R", "config.models[0]: unknown key 'stratgies'; known: ["),
    ("run", "--config not_yaml.yaml --out R", "not_yaml.yaml is not valid YAML"),
    ("run", "--config missing.yaml --out R", "config file not found: missing.yaml"),
    ("run", "--limit 0 --out R", "config.limit must be >= 1, got 0"),
    ("run", "--seed -1 --out R", "--seed must be >= 0, got -1"),
    ("run", "--out junk.txt", "cannot write junk.txt: it is a file, not a folder"),
    ("run", "--force bogus --out R", "argument --force: invalid choice: 'bogus'"),
    ("train-vqvae", "--epochs 0 --out v.pt", "epochs must be >= 1, got 0"),
    ("train-vqvae", "--batch-size 0 --out v.pt", "batch_size must be >= 1, got 0"),
    ("train-vqvae", "--lr -1 --out v.pt", "lr must be > 0, got -1.0"),
    ("train-vqvae", "--patience -1 --out v.pt", "patience must be >= 0, got -1"),
    ("train-vqvae", "--epochs 0 --lr -1 --out v.pt", "epochs must be >= 1, got 0; lr must be > 0, got -1.0"),
    ("train-vqvae", "--epochs 1.5 --out v.pt", "argument --epochs: invalid int value: '1.5'"),
    ("train-vqvae", "--K 0 --limit 20 --out v.pt", "K must be >= 1, got 0"),
    ("train-vqvae", "--grid 3 3 --limit 20 --out v.pt", "latent grid 3x3 is not reachable"),
    ("train-vqvae", "--quantizer-opt foo --limit 20 --out v.pt", "--quantizer-opt expects KEY=VALUE, got 'foo'"),
    ("train-vqvae", "--out junk.txt/v.pt", "junk.txt is a file, not a folder"),
    ("train-vqvae", "--device meta --out v.pt", "device type 'meta' is not supported"),
    ("train-prior", "--vqvae missing.pt --out p.pt", "checkpoint not found: missing.pt"),
    ("train-prior", "--vqvae prior.pt --limit 20 --out p.pt", "prior.pt is not a vq2pc vqvae checkpoint"),
    ("train-prior", "--vqvae vq.pt --lr -1 --out p.pt", "lr must be > 0, got -1.0"),
    ("distill", "--vqvae vq.pt --prior prior3.pt --out c2.safetensors", "--prior (K=3, grid (2, 2)) does not match"),
    (
        "distill",
        "--vqvae vq.pt --prior prior.pt --components 0 --out c2.safetensors",
        "N must be a positive integer, got 0",
    ),
    (
        "distill",
        "--vqvae vq.pt --prior prior.pt --strategy beam -N 10 --starts 0 --out c2.safetensors",
        "starts must be >= 1",
    ),
    (
        "distill",
        "--vqvae vq.pt --prior prior.pt --strategy exhaustive --max-space 10 --out c2.safetensors",
        "exceeds max_space = 10",
    ),
    ("distill", "--vqvae vq.pt --prior prior.pt --std-min -1 --out c2.safetensors", "std_floor must be a positive"),
    (
        "distill",
        "--vqvae vq.pt --prior prior.pt --strategy sample -N 300 --out c2.safetensors",
        "N=300 exceeds the latent space",
    ),
    ("evaluate", "c.safetensors --draws 0 --limit 20", "draws must be >= 1, got 0"),
    ("evaluate", "vq.pt --limit 20", "vq.pt is not a readable vq2pc circuit"),
    ("usage", "--prior vq.pt --out u.png", "vq.pt is not a vq2pc prior checkpoint"),
    ("sample", "c.safetensors -n 0 --out s.png", "n must be a positive number of samples, got 0"),
    ("sample", "c.safetensors --image-shape 1 4 4 --out s.png", "image shape (1, 4, 4) does not have S=64 entries"),
    ("inpaint", "c.safetensors --images missing.npy --out i.png", "images file not found: missing.npy"),
    ("inpaint", "c.safetensors --images bad.npy --out i.png", "images have shape (4, 1, 3, 3); expected [n, 1, 8, 8]"),
    ("inpaint", "c.safetensors --images junk.txt --out i.png", "cannot read images file junk.txt"),
    ("inpaint", "c.safetensors --images img.npy --show 0 --out i.png", "--show must be >= 1"),
    ("refine", "c.safetensors --iterations -1 --limit 20 --out r.safetensors", "iterations must be >= 0"),
    ("refine", "c.safetensors --batch-size 0 --limit 20 --out r.safetensors", "batch_size must be >= 1"),
    ("refine", "c.safetensors --std-min 2 --limit 20 --out r.safetensors", "max_std must be >= min_std"),
    ("export", "c.safetensors --format onnx --out x.npz", "argument --format: invalid choice: 'onnx'"),
    ("export", "junk.txt --format npz --out x.npz", "junk.txt is not a readable vq2pc circuit"),
]
if NO_CUDA:
    CASES.append(("run", "--device cuda --out R", "--device cuda: CUDA is not available on this machine"))
if UNWRITABLE:
    CASES += [
        ("run", f"--out {UNWRITABLE}/run", f"cannot write {UNWRITABLE}/run: Permission denied"),
        ("sample", f"c.safetensors --out s.png --npy {UNWRITABLE}/s.npy", f"cannot write {UNWRITABLE}/s.npy"),
        ("export", f"c.safetensors --format npz --out {UNWRITABLE}/x.npz", f"cannot write {UNWRITABLE}/x.npz"),
    ]

# The same checks through a real `python -m vq2pc` process (the script's exit code and stderr).
SUBPROCESS = [
    ("run", "--config k_many.yaml --out R", "config.models[0].K must be an integer, got 'many'"),
    ("train-vqvae", "--device cuda:x --out v.pt", "'cuda:x' is not a torch device"),
    ("sample", "c.safetensors --num-samples 0 --out s.png", "n must be a positive number of samples"),
]
if NO_CUDA:
    SUBPROCESS.append(("run", "--device cuda --out R", "CUDA is not available"))
if UNWRITABLE:
    SUBPROCESS.append(("train-vqvae", f"--out {UNWRITABLE}/v.pt", "Permission denied"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny inputs: untrained 8x8 VQ-VAE (K=4, 2x2 grid), two priors (K=4, K=3), a 5-component circuit, images."""
    d = tmp_path_factory.mktemp("mistakes")
    torch.manual_seed(0)
    VQVAE(VQVAEConfig(image_shape=(1, 8, 8), levels=17, K=4, D=4, hidden=8, res_blocks=0)).save(d / "vq.pt")
    for K, name in ((4, "prior.pt"), (3, "prior3.pt")):
        PixelCNNPrior(PriorConfig(K=K, latent_hw=(2, 2), num_classes=10, hidden=8, layers=1)).save(d / name)
    leaf = Gaussian(torch.rand(5, 64), torch.full((5, 64), 0.2))
    MixtureCircuit(leaf, torch.zeros(5), meta={"image_shape": [1, 8, 8], "levels": 17}).save(d / "c.safetensors")
    np.save(d / "img.npy", np.random.default_rng(0).integers(0, 17, (4, 1, 8, 8)).astype(np.uint8))
    np.save(d / "bad.npy", np.zeros((4, 3, 3)))
    (d / "junk.txt").write_text("not a model\n")
    for name, text in YAML.items():
        (d / name).write_text(text)
    return d


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_in_process(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors exit
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


def assert_one_line_failure(code: int, err: str, verb: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert code != 0, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"vq2pc {verb}: error: "), lines[0]
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("verb, args, expected", CASES, ids=[f"{v} {a}" for v, a, _ in CASES])
def test_mistake_is_one_line(
    workdir: Path,
    verb: str,
    args: str,
    expected: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(workdir)
    before = listing(workdir)
    code, err = run_in_process([verb, *args.split()], capsys)
    assert_one_line_failure(code, err, verb, expected)
    assert listing(workdir) == before


@pytest.fixture(scope="module")
def script_runs(workdir: Path) -> dict[str, tuple[int, str]]:
    """Every ``SUBPROCESS`` case plus one ``--debug`` run, started at once (the imports dominate): argv -> (code, stderr)."""
    before = listing(workdir)
    argvs = [[verb, *args.split()] for verb, args, _ in SUBPROCESS] + [["--debug", "train-vqvae", "--epochs", "0"]]
    procs = [start_python(["-m", "vq2pc", *argv], cwd=workdir) for argv in argvs]
    results = {" ".join(argv): (p.wait(timeout=600), p.stderr.read()) for argv, p in zip(argvs, procs)}
    assert listing(workdir) == before  # no process left a file behind
    return results


@pytest.mark.slow
@pytest.mark.parametrize("verb, args, expected", SUBPROCESS, ids=[f"{v} {a}" for v, a, _ in SUBPROCESS])
def test_mistake_through_the_script(
    script_runs: dict[str, tuple[int, str]], verb: str, args: str, expected: str
) -> None:
    code, err = script_runs[f"{verb} {args}"]
    assert_one_line_failure(code, err, verb, expected)


@pytest.mark.slow
def test_debug_shows_the_traceback(script_runs: dict[str, tuple[int, str]]) -> None:
    code, err = script_runs["--debug train-vqvae --epochs 0"]
    assert code != 0 and "Traceback" in err and "epochs must be >= 1, got 0" in err


def test_debug_after_the_verb_raises(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workdir)
    with pytest.raises(ValueError, match="batch_size must be"):
        main(["train-vqvae", "--batch-size", "0", "--out", "v.pt", "--debug"])


def _raise(exc: BaseException) -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return fail


@pytest.mark.parametrize(
    "exc, expected",
    [
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
            "out of memory: lower --num-samples",
        ),
        (
            RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: out of memory"),
            "out of memory: lower --num-samples",
        ),
        (RuntimeError("boom"), "unexpected RuntimeError: boom (re-run with --debug for the traceback)"),
    ],
    ids=["cuda-oom", "cpu-oom", "unexpected"],
)
def test_deep_failure_while_sampling_is_one_line(
    workdir: Path,
    exc: BaseException,
    expected: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(MixtureCircuit, "sample", _raise(exc))
    before = listing(workdir)
    code, err = run_in_process(["sample", "c.safetensors", "--out", "s.png"], capsys)
    assert_one_line_failure(code, err, "sample", expected)
    assert listing(workdir) == before


def test_a_refused_write_deep_inside_is_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(MixtureCircuit, "save", _raise(PermissionError(13, "Permission denied", "r.safetensors")))
    code, err = run_in_process(
        ["refine", "c.safetensors", "--limit", "20", "--iterations", "1", "--out", "r.safetensors"], capsys
    )
    assert_one_line_failure(code, err, "refine", "Permission denied: r.safetensors")


def test_run_that_fails_loading_data_leaves_no_folder(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import vq2pc.pipeline.orchestrate as pipeline

    monkeypatch.chdir(workdir)
    monkeypatch.setattr(
        pipeline,
        "load_dataset",
        _raise(FileNotFoundError("mnist file train-images-idx3-ubyte.gz not found (searched D)")),
    )
    before = listing(workdir)
    code, err = run_in_process(["run", "--dataset", "mnist", "--out", "runs/new"], capsys)
    assert_one_line_failure(code, err, "run", "train-images-idx3-ubyte.gz not found")
    assert listing(workdir) == before  # no runs/new, no config.yaml
