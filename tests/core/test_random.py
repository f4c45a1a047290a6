"""Device-safe random draws (vq2pc.core.random): drawn on the generator's device, delivered on the requested one.

No GPU in CI: the 'meta' device stands in for "a device other than the generator's" (torch refuses a CPU
generator for a CUDA draw; the helpers draw on the CPU and move the result).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vq2pc.circuit.mixture import MixtureCircuit
from vq2pc.core import random as rnd
from vq2pc.core.leaves import Bernoulli, Categorical, Gaussian

DRAWS = {
    "uniform": lambda g, d: rnd.uniform((3, 4), g, d, torch.float64),
    "normal": lambda g, d: rnd.normal((3, 4), g, d, torch.float64),
    "randint": lambda g, d: rnd.randint(7, (3, 4), g, d),
    "gumbel": lambda g, d: rnd.gumbel_noise((3, 4), g, d),
}


@pytest.mark.parametrize("name", DRAWS)
def test_cpu_generator_draws_for_another_device(name: str) -> None:
    out = DRAWS[name](torch.Generator().manual_seed(0), torch.device("meta"))
    assert out.device.type == "meta" and out.shape == (3, 4)


@pytest.mark.parametrize("name", DRAWS)
def test_same_seed_same_numbers_and_the_generator_advances(name: str) -> None:
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a, b = DRAWS[name](g1, "cpu"), DRAWS[name](g2, "cpu")
    assert torch.equal(a, b)
    assert not torch.equal(DRAWS[name](g1, "cpu"), a)  # the stream moved on


def test_draws_have_the_right_distribution() -> None:
    g = torch.Generator().manual_seed(0)
    u, z = rnd.uniform((20000,), g, "cpu"), rnd.normal((20000,), g, "cpu")
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01
    assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1) < 0.03
    probs = torch.tensor([[0.0, 1.0, 3.0], [5.0, 0.0, 0.0]]).expand(2, 3)
    idx = rnd.categorical(probs.repeat(5000, 1).view(5000, 2, 3), g)
    assert idx.shape == (5000, 2) and bool((idx[:, 1] == 0).all()) and bool((idx[:, 0] != 0).all())
    assert abs(float((idx[:, 0] == 2).double().mean()) - 0.75) < 0.02


def test_uniform_in_place_matches_the_fresh_draw() -> None:
    out = torch.empty(6, dtype=torch.float64)
    rnd.uniform_(out, torch.Generator().manual_seed(3))
    assert torch.equal(out, rnd.uniform((6,), torch.Generator().manual_seed(3), "cpu", torch.float64))
    meta = torch.empty(6, device="meta")
    assert rnd.uniform_(meta, torch.Generator().manual_seed(3)).device.type == "meta"


@pytest.mark.parametrize("bad", [42, np.random.default_rng(0), "cpu"], ids=["int", "numpy", "str"])
def test_a_bad_generator_is_a_clear_error(bad: object) -> None:
    for draw in (*DRAWS.values(), lambda g, d: rnd.categorical(torch.ones(2, 3), g)):
        with pytest.raises(ValueError, match=r"generator must be a torch\.Generator or None"):
            draw(bad, "cpu")
    circuit = MixtureCircuit(Gaussian(torch.zeros(2, 3), torch.ones(2, 3)), torch.zeros(2))
    with pytest.raises(ValueError, match=r"generator must be a torch\.Generator"):
        circuit.sample(4, generator=bad)


@pytest.mark.parametrize(
    "leaf",
    [Gaussian(torch.zeros(2, 3), torch.ones(2, 3)), Categorical(torch.zeros(2, 3, 4)), Bernoulli(torch.zeros(2, 3))],
    ids=["gaussian", "categorical", "bernoulli"],
)
def test_leaves_and_circuits_sample_through_the_helpers(leaf: object) -> None:
    a = leaf.sample(torch.Generator().manual_seed(1))
    assert a.shape == (2, 3) and torch.equal(a, leaf.sample(torch.Generator().manual_seed(1)))
    circuit = MixtureCircuit(leaf, torch.zeros(2))
    x = circuit.sample(5, generator=torch.Generator().manual_seed(2))
    assert x.shape == (5, 3) and torch.equal(x, circuit.sample(5, generator=torch.Generator().manual_seed(2)))
