"""Lossless coding with a circuit: bit-exact round trips, code length = -log2 p̂(x), one error per bad input."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vq2pc import Bernoulli, Categorical, Gaussian, MixtureCircuit, compress, decompress
from vq2pc.circuit.codec import CodecError, decode, encode, read_header
from vq2pc.circuit.codec.format import unpack
from vq2pc.circuit.codec.model import bits_bound
from vq2pc.core.leaves import DiscretizedGaussian, DiscretizedLogistic

pytest.importorskip("constriction")


def _circuit(n: int, s: int, levels: int, seed: int, scale: float = 2.0) -> MixtureCircuit:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, s, levels, generator=g) * scale
    return MixtureCircuit(
        Categorical(logits), torch.randn(n, generator=g), meta={"image_shape": [1, 8, 8]} if s == 64 else {}
    )


@pytest.fixture(scope="module")
def digits() -> tuple[MixtureCircuit, torch.Tensor, bytes]:
    c = _circuit(64, 64, 17, seed=0)
    x = c.sample(40, generator=torch.Generator().manual_seed(1)).long()
    return c, x, encode(c, x, rows=16)


def test_round_trip_digits_sized(digits: tuple[MixtureCircuit, torch.Tensor, bytes]) -> None:
    c, x, data = digits
    y = decode(c, data)
    assert y.dtype == np.uint8 and y.shape == (40, 1, 8, 8)  # the circuit's stored image shape
    assert np.array_equal(y.reshape(40, -1), x.numpy())


def test_round_trip_random_images_and_determinism() -> None:
    c = _circuit(64, 49, 256, seed=2)
    x = torch.randint(0, 256, (20, 7, 7), generator=torch.Generator().manual_seed(3))  # far from the model
    data = encode(c, x, rows=16, threads=1)
    assert encode(c, x, rows=16, threads=2) == data  # same bytes whatever the number of workers
    assert np.array_equal(decode(c, data, threads=2), x.numpy())


def test_code_length_is_minus_log2_p(digits: tuple[MixtureCircuit, torch.Tensor, bytes]) -> None:
    """Each block's stream is within the derived bound of its images' information content."""
    c, x, data = digits
    header, offsets, _, _ = unpack(data)
    logits = c.leaf.logits.double()  # exact log p̂(x) in float64, independent of the kernels
    comp = logits[:, torch.arange(64)[None, :], x].sum(2)  # [N, B]
    info = -torch.logsumexp(comp + c.log_weights.double()[:, None], 0) / math.log(2)  # [B] bits
    for b in range(header.num_blocks):
        bits = 8 * int(offsets[b + 1] - offsets[b])
        block_info = float(info[b * 16 : (b + 1) * 16].sum())
        n_sym = 64 * min(16, 40 - 16 * b)
        assert block_info - 1 <= bits <= block_info + bits_bound(n_sym, 17) + 64 + 0.01
    assert len(data) * 8 <= float(info.sum()) + 8 * 1000  # the whole file: + header and index


def test_random_access_decodes_image_k_alone(digits: tuple[MixtureCircuit, torch.Tensor, bytes]) -> None:
    c, x, data = digits
    y = decode(c, data, indices=[37, 2])
    assert np.array_equal(y.reshape(2, -1), x[[37, 2]].numpy())
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 39\]"):
        decode(c, data, indices=[40])


def test_bad_files_fail_with_one_error(digits: tuple[MixtureCircuit, torch.Tensor, bytes]) -> None:
    c, _, data = digits
    with pytest.raises(CodecError, match="another circuit"):
        decode(_circuit(64, 64, 17, seed=9), data)
    corrupt = bytearray(data)
    corrupt[-5] ^= 0xFF
    with pytest.raises(CodecError, match="block 2 fails its checksum"):
        decode(c, bytes(corrupt))
    with pytest.raises(CodecError, match="truncated"):
        decode(c, data[:-7])
    with pytest.raises(CodecError, match="truncated"):
        read_header(data[:30])
    with pytest.raises(CodecError, match="not a vq2pc compressed file"):
        decode(c, b"PK\x03\x04" + data[4:])
    bad_header = bytearray(data)
    bad_header[20] ^= 0x01
    with pytest.raises(CodecError, match="header fails its checksum"):
        read_header(bytes(bad_header))


def test_bad_images_and_continuous_circuits_are_refused() -> None:
    c = _circuit(8, 64, 17, seed=4)
    with pytest.raises(ValueError, match=r"images must hold integer levels in \[0, 16\]"):
        encode(c, torch.full((3, 64), 17))
    with pytest.raises(ValueError, match="images has shape"):
        encode(c, torch.zeros(3, 63, dtype=torch.long))
    with pytest.raises(ValueError, match="rows must be a positive integer"):
        encode(c, torch.zeros(3, 64, dtype=torch.long), rows=0)
    gauss = MixtureCircuit(Gaussian(torch.rand(8, 64), torch.full((8, 64), 0.1)), torch.zeros(8))
    with pytest.raises(CodecError, match="cannot compress with a gaussian circuit"):
        encode(gauss, torch.zeros(3, 64, dtype=torch.long))


def test_bernoulli_round_trip() -> None:
    g = torch.Generator().manual_seed(5)
    c = MixtureCircuit(Bernoulli(torch.randn(16, 30, generator=g) * 3), torch.zeros(16))
    x = c.sample(17, generator=g).long()
    assert np.array_equal(decode(c, encode(c, x)), x.numpy())


def test_package_level_api(digits: tuple[MixtureCircuit, torch.Tensor, bytes]) -> None:
    c, x, data = digits
    assert compress(c, x, rows=16) == data
    assert np.array_equal(decompress(c, data, indices=[3]).reshape(1, -1), x[3:4].numpy())


def _info_bits(c: MixtureCircuit, x: torch.Tensor) -> float:
    """``Σ -log2 p̂(x)`` in float64 from the leaf table."""
    s = x.shape[1]
    comp = c.leaf.logits.double()[:, torch.arange(s)[None, :], x].sum(2)  # [N, B]
    return float((-torch.logsumexp(comp + c.log_weights.double()[:, None], 0) / math.log(2)).sum())


def test_code_length_follows_p_hat_for_far_and_dead_components() -> None:
    """A component of weight 2^-80 is followed exactly (not floored up, not dropped); one of weight 0 stays 0."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 40, 16, generator=g) * 2  # every level above 2^-24: no pixel hits the coder floor
    log_w = torch.tensor([0.0, -80 * math.log(2), -math.inf])
    c = MixtureCircuit(Categorical(logits), log_w)
    for k in (1, 2):  # images drawn from the far component, then from the dead one
        x = Categorical(logits[k : k + 1].expand(16, -1, -1)).sample(g).long()
        data = encode(c, x, rows=16)
        _, offsets, _, _ = unpack(data)
        info = _info_bits(c, x)
        assert info - 1 <= 8 * int(offsets[-1]) <= info + bits_bound(16 * 40, 16) + 64
        assert np.array_equal(decode(c, data), x.numpy())


class _LevelsLeaf:
    """A stand-in for a discretized leaf: it gives its per-pixel table through the codec's hook."""

    kind = "discretized"

    def __init__(self, logits: torch.Tensor) -> None:  # [N, S, L] normalized log-probabilities
        self.logits, self.num_levels, self.batch_shape = logits, logits.shape[2], logits.shape[:2]

    def pixel_log_table(self, i: int) -> torch.Tensor:
        return self.logits[:, i, :].T  # [L, N]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"logits": self.logits}


def test_a_leaf_with_pixel_log_tables_plugs_in(digits: tuple[MixtureCircuit, torch.Tensor, bytes]) -> None:
    """Any leaf with ``pixel_log_table(i) -> [L, N]`` and ``num_levels`` codes like the categorical it mirrors."""
    c, x, data = digits
    fake = SimpleNamespace(leaf=_LevelsLeaf(c.leaf.logits.contiguous()), log_weights=c.log_weights, meta=c.meta)
    other = encode(fake, x, rows=16)
    assert np.array_equal(decode(fake, other), decode(c, data))
    assert unpack(other)[1].tolist() == unpack(data)[1].tolist()  # the same code words, block by block
    assert other[-200:] == data[-200:]


@pytest.mark.parametrize("leaf", [DiscretizedGaussian, DiscretizedLogistic])
def test_discretized_circuits_round_trip_at_their_code_length(leaf: type) -> None:
    """Discretized leaves (two numbers per pixel and component) code through their per-pixel level tables:
    bit-exact, at ``-log2 p̂(x)`` within the coder's bound."""
    g = torch.Generator().manual_seed(11)
    c = MixtureCircuit(
        leaf(torch.rand(12, 64, generator=g), 0.02 + 0.2 * torch.rand(12, 64, generator=g), 256), torch.zeros(12)
    )
    x = c.sample(24, generator=torch.Generator().manual_seed(12)).long()
    data = encode(c, x, rows=16)
    assert np.array_equal(decode(c, data), x.numpy().astype(np.uint8))
    comp = c.leaf.map(torch.Tensor.double).log_prob(x[:, None, :]).sum(-1)  # [B, N], float64, no kernels
    info = float((-torch.logsumexp(comp + c.log_weights.double(), 1)).sum()) / math.log(2)
    header, offsets, _, _ = unpack(data)
    bits = 8 * int(offsets[-1])
    assert info - 1 <= bits <= info + bits_bound(x.numel(), 256) + 64 * header.num_blocks


def test_changing_the_circuit_in_place_is_noticed() -> None:
    """The digest cache follows in-place edits of the circuit's tensors."""
    c = _circuit(16, 64, 17, seed=7)
    x = c.sample(16, generator=torch.Generator().manual_seed(8)).long()
    data = encode(c, x, rows=16)
    c.leaf.logits[0, 0].add_(0.5)  # the table itself (the leaf's logits are a view of it)
    with pytest.raises(CodecError, match="another circuit"):
        decode(c, data)
