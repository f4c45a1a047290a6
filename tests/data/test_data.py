"""Tests of vq2pc.data and vq2pc.data.idx: IDX reader, lookup, download, splits, model space, BPD."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MNIST_DIR, needs_mnist

from vq2pc import data
from vq2pc.data import idx

# --data-dir spellings that find MNIST: its folder, and the folder above when that one is a `mnist/`
DATA_DIRS = [] if MNIST_DIR is None else [MNIST_DIR] + [MNIST_DIR.parent] * (MNIST_DIR.name == "mnist")


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No $VQ2PC_DATA, a private cache dir, and a network that always fails."""
    monkeypatch.delenv("VQ2PC_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def no_network(url: str) -> bytes:
        raise OSError(f"no network for {url}")

    monkeypatch.setattr(idx, "_fetch", no_network)
    return tmp_path


def _write_idx(path: Path, magic: int, shape: tuple[int, ...], payload: bytes) -> None:
    header = struct.pack(f">I{len(shape)}I", magic, *shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + payload)


# --- IDX reader on the real files -----------------------------------------------------------------
@needs_mnist
def test_read_idx_sanity_values() -> None:
    labels = idx.read_idx(MNIST_DIR / "train-labels-idx1-ubyte.gz", idx.LABELS_MAGIC)
    images = idx.read_idx(MNIST_DIR / "train-images-idx3-ubyte.gz", idx.IMAGES_MAGIC)
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert int(images.sum(dtype=np.int64)) == 1_567_298_545


@pytest.mark.slow
@needs_mnist
@pytest.mark.parametrize("data_dir", DATA_DIRS or [None])
def test_mnist_splits(data_dir: Path) -> None:
    s = data.load_dataset("mnist", str(data_dir))
    assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (50000, 10000, 10000)
    assert s.levels == 256 and s.image_shape == (1, 28, 28) and s.num_classes == 10
    assert s.train_x.dtype == torch.uint8 and s.train_y.dtype == torch.int64
    assert s.test_y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    # train and val partition the training file: no image index is shared, all are used
    order = torch.randperm(60000, generator=torch.Generator().manual_seed(0))
    train_idx, val_idx = set(order[:50000].tolist()), set(order[50000:].tolist())
    assert not train_idx & val_idx and len(train_idx | val_idx) == 60000
    full = torch.from_numpy(idx.read_idx(MNIST_DIR / "train-images-idx3-ubyte.gz", idx.IMAGES_MAGIC))
    assert torch.equal(s.val_x[:5, 0], full[order[50000:50005]])
    total = int(s.train_x.sum(dtype=torch.int64)) + int(s.val_x.sum(dtype=torch.int64))
    assert total == 1_567_298_545


@pytest.mark.slow
@needs_mnist
def test_env_var_lookup_and_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VQ2PC_DATA", str(DATA_DIRS[-1]))
    a = data.load_dataset("mnist", limit=7, seed=3)
    b = data.load_dataset("mnist", limit=7, seed=3)
    c = data.load_dataset("mnist", limit=7, seed=4)
    assert len(a.train_x) == len(a.val_x) == len(a.test_x) == 7
    assert torch.equal(a.train_x, b.train_x) and not torch.equal(a.train_x, c.train_x)


# --- corrupt and missing files ---------------------------------------------------------------------
def test_truncated_gzip_names_file(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    _write_idx(path, idx.IMAGES_MAGIC, (2, 3, 3), bytes(18))
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz"):
        idx.read_idx(path, idx.IMAGES_MAGIC)


def test_wrong_magic_and_size(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    _write_idx(path, idx.IMAGES_MAGIC, (2, 3, 3), bytes(18))
    with pytest.raises(ValueError, match=r"labels\.gz.*magic"):
        idx.read_idx(path, idx.LABELS_MAGIC)
    _write_idx(path, idx.LABELS_MAGIC, (5,), bytes(4))
    with pytest.raises(ValueError, match=r"labels\.gz.*5 bytes"):
        idx.read_idx(path, idx.LABELS_MAGIC)
    _write_idx(path, idx.LABELS_MAGIC, (4,), bytes([1, 2, 3, 4]))
    assert idx.read_idx(path, idx.LABELS_MAGIC).tolist() == [1, 2, 3, 4]


def test_wrong_md5_names_file(tmp_path: Path) -> None:
    (tmp_path / "mnist").mkdir()
    bad = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    _write_idx(bad, idx.IMAGES_MAGIC, (1, 28, 28), bytes(784))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*md5"):
        data.load_dataset("mnist", str(tmp_path))


def test_missing_files_one_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        data.load_dataset("fashion-mnist", str(empty))
    msg = str(info.value)
    assert "train-images-idx3-ubyte.gz" in msg and str(empty) in msg
    assert str(tmp_path / "cache" / "vq2pc") in msg and "download" in msg and "no network" in msg
    assert not (tmp_path / "cache" / "vq2pc" / "fashion-mnist" / "train-images-idx3-ubyte.gz").exists()
    with pytest.raises(FileNotFoundError, match="disabled"):
        data.load_dataset("mnist", str(empty), download=False)


@needs_mnist
def test_download_is_md5_checked_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A (simulated) mirror serving the right bytes fills the cache; wrong bytes leave nothing behind."""
    src = MNIST_DIR / "t10k-labels-idx1-ubyte.gz"
    dest = tmp_path / "cache" / "vq2pc" / "mnist" / src.name
    md5 = idx.IDX_SOURCES["mnist"].files["test_labels"][1]
    calls: list[str] = []

    def wrong_then_right(url: str) -> bytes:
        calls.append(url)
        return b"garbage" if len(calls) == 1 else src.read_bytes()

    monkeypatch.setattr(idx, "_fetch", wrong_then_right)
    assert idx.download_file(src.name, md5, ("https://a/", "https://b/"), dest) == dest
    assert calls == ["https://a/" + src.name, "https://b/" + src.name]
    assert idx.md5sum(dest) == md5 and not dest.with_name(dest.name + ".tmp").exists()
    monkeypatch.setattr(idx, "_fetch", lambda url: b"garbage")
    other = dest.with_name("other.gz")
    with pytest.raises(OSError, match="md5"):
        idx.download_file(src.name, md5, ("https://a/",), other)
    assert not other.exists() and not other.with_name("other.gz.tmp").exists()


def test_unknown_dataset_and_bad_limit() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("cifar100")
    with pytest.raises(ValueError, match="limit"):
        data.load_dataset("digits", limit=0)


# --- digits ----------------------------------------------------------------------------------------
def test_digits_splits() -> None:
    s = data.load_dataset("digits", seed=0)
    assert s.levels == 17 and s.image_shape == (1, 8, 8) and s.num_variables == 64
    assert (len(s.train_x), len(s.val_x), len(s.test_x)) == (1200, 300, 297)
    assert int(torch.cat([s.train_x, s.val_x, s.test_x]).max()) == 16
    assert set(torch.cat([s.train_y, s.val_y, s.test_y]).tolist()) == set(range(10))
    t = data.load_dataset("digits", seed=1, limit=10)
    assert len(t.train_x) == 10 and not torch.equal(t.train_x, s.train_x[:10])


# --- model space and BPD ---------------------------------------------------------------------------
def test_to_model_space() -> None:
    v = torch.tensor([[0, 1, 8, 9, 16]], dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    x = data.to_model_space(v, "gaussian", 17, g)
    assert x.dtype == torch.float32
    assert ((x * 17).floor() == v.float()).all()  # (v + u) / L with u in [0, 1)
    x2 = data.to_model_space(v, "gaussian", 17, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    assert data.to_model_space(v, "categorical", 17).tolist() == [[0.0, 1.0, 8.0, 9.0, 16.0]]
    assert data.to_model_space(v, "bernoulli", 17).tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0]]
    big = torch.randint(0, 256, (20000,), dtype=torch.uint8)
    u = data.to_model_space(big, "gaussian", 256, g) * 256 - big.float()
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.003


def test_to_model_space_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="levels"):
        data.to_model_space(torch.tensor([17]), "gaussian", 17)
    with pytest.raises(ValueError, match="integer"):
        data.to_model_space(torch.tensor([0.5]), "gaussian", 17)
    with pytest.raises(ValueError, match="leaf kind"):
        data.to_model_space(torch.tensor([1]), "poisson", 17)


def test_bpd_of_known_distributions() -> None:
    S, L = 64, 17
    # uniform density 1 on [0,1]^S: log p = 0, so BPD = log2 L exactly (the bits of uniform levels)
    assert float(data.bpd(torch.zeros(3, dtype=torch.float64), S, L, "gaussian")[0]) == pytest.approx(
        math.log2(L), abs=1e-12
    )
    # uniform categorical over L levels: log P = -S log L  ->  log2 L bits per dimension
    lp = torch.full((2,), -S * math.log(L), dtype=torch.float64)
    assert data.bpd(lp, S, L, "categorical").tolist() == pytest.approx([math.log2(L)] * 2, abs=1e-12)
    # fair coin per pixel: 1 bit
    assert float(data.bpd(torch.tensor(-S * math.log(2.0)), S, 2, "bernoulli")) == pytest.approx(1.0)
    # Eq. 7 for L = 256: -log2 p / S + 8
    assert float(data.bpd(torch.tensor(-784.0), 784, 256, "gaussian")) == pytest.approx(1 / math.log(2) + 8)
