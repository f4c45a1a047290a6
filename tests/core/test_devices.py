"""core.devices: denormal floats flushed to zero inside ``flush_denormals`` on CPU, kept outside."""

import pytest
import torch

from vq2pc.core.devices import flush_denormals

DENORMAL = 1e-39  # below float32's smallest normal number (~1.18e-38)


def _survives() -> bool:
    """Whether a float32 denormal survives arithmetic right now."""
    return bool((torch.tensor([DENORMAL], dtype=torch.float32) * 1.0).item() != 0.0)


@pytest.fixture(autouse=True)
def _needs_ftz() -> None:
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals (torch.set_flush_denormal returned False)")
    torch.set_flush_denormal(False)


def test_flushed_inside_kept_after() -> None:
    assert _survives()
    with flush_denormals("cpu"):
        assert not _survives()
    assert _survives()


def test_restored_after_an_error() -> None:
    with pytest.raises(RuntimeError, match="boom"), flush_denormals("cpu"):
        raise RuntimeError("boom")
    assert _survives()


def test_other_devices_leave_the_cpu_alone() -> None:
    with flush_denormals("cuda"):  # a device name only: nothing runs on it
        assert _survives()
