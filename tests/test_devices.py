"""Where SDXL users' GPUs are: CUDA (NVIDIA, and AMD through ROCm), Apple Silicon (MPS) and
Intel (XPU), picked by `auto` in that order, each in its precision, its memory read from its own
torch module, its out-of-memory recognised. This machine has none of them: the tests stand
torch's device modules in with MOCKS (named so below), and check too that no `torch.cuda` call
runs for another device."""

from __future__ import annotations

import pytest
import torch

from backends.sdxl_backend import device as devices
from backends.sdxl_backend.device import (
    Placement,
    allocated_memory,
    device_memory,
    device_vendor,
    empty_cache,
    is_out_of_memory,
    select_placement,
)
from backends.sdxl_backend.errors import OutOfMemory
from backends.sdxl_backend.models.manager import ModelManager
from tests.served import start_that_fails


@pytest.fixture
def mock_gpus(monkeypatch):
    """MOCK: which device families torch reports (none exists on this machine), and torch.cuda
    made to fail loudly if anything calls it for another family."""

    def having(*families: str) -> None:
        monkeypatch.setattr(devices, "available", lambda family: family in (*families, "cpu"))
        monkeypatch.setattr(devices, "device_count", lambda family: 1 if family in (*families, "cpu") else 0)

    def no_cuda(*args, **kwargs):
        raise AssertionError("a torch.cuda call for a device that is not CUDA")

    for name in ("empty_cache", "mem_get_info", "memory_allocated", "get_device_name", "is_bf16_supported"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    return having


def test_auto_tries_cuda_then_mps_then_xpu_then_the_cpu_each_in_its_precision(mock_gpus, monkeypatch):
    mock_gpus("mps", "xpu")
    assert select_placement() == Placement(torch.device("mps"), torch.float16)
    mock_gpus("xpu")
    assert select_placement() == Placement(torch.device("xpu"), torch.bfloat16)
    mock_gpus()
    assert select_placement() == Placement(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # MOCK: an older CUDA card
    mock_gpus("cuda", "mps")
    assert select_placement() == Placement(torch.device("cuda"), torch.float16)
    assert select_placement("mps", "float32") == Placement(torch.device("mps"), torch.float32)


def test_a_device_that_is_not_there_is_refused_saying_what_is(mock_gpus):
    mock_gpus("xpu")
    with pytest.raises(ValueError, match=r"device mps is not there \(cuda: 0, mps: 0, xpu: 1\)"):
        select_placement("mps")
    with pytest.raises(ValueError, match="device xpu:1 is not there"):
        select_placement("xpu:1")


def test_mps_memory_comes_from_torch_mps_and_never_from_torch_cuda(mock_gpus, monkeypatch):
    mock_gpus("mps")
    emptied = []
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 3 * 2**30)  # MOCK: Metal's driver
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 21 * 2**30)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 2 * 2**30)
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: emptied.append("mps"))
    placement = select_placement()
    assert device_memory(placement) == (3 * 2**30, 21 * 2**30)  # unified memory: what Metal holds, what it advises
    assert allocated_memory(placement) == 2 * 2**30
    empty_cache(placement.device)
    assert emptied == ["mps"] and device_vendor(placement.device) == "Apple"


def test_xpu_memory_comes_from_torch_xpu(mock_gpus, monkeypatch):
    mock_gpus("xpu")
    monkeypatch.setattr(torch.xpu, "mem_get_info", lambda device: (12 * 2**30, 16 * 2**30))  # MOCK: an Arc card
    monkeypatch.setattr(torch.xpu, "memory_allocated", lambda device: 3 * 2**30)
    placement = select_placement("xpu")
    assert device_memory(placement) == (4 * 2**30, 16 * 2**30) and allocated_memory(placement) == 3 * 2**30
    assert device_vendor(placement.device) == "Intel"


def test_rocm_serves_amd_cards_as_cuda_and_says_so(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.4.0")  # MOCK: torch's ROCm build
    assert device_vendor(torch.device("cuda")) == "AMD"
    monkeypatch.setattr(torch.version, "hip", None)
    assert device_vendor(torch.device("cuda")) == "NVIDIA" and device_vendor(torch.device("cpu")) == "cpu"


def test_each_familys_out_of_memory_is_recognised_and_recovered_as_cuda_s(mock_gpus, monkeypatch):
    mps_words = "MPS backend out of memory (MPS allocated: 17.80 GB, other allocations: 1.20 GB, max allowed: 18.13 GB)"
    assert is_out_of_memory(RuntimeError(mps_words)) and is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("Expected all tensors to be on the same device"))
    mock_gpus("mps")
    for name, value in (("driver_allocated_memory", 0), ("recommended_max_memory", 2**34), ("empty_cache", None)):
        monkeypatch.setattr(torch.mps, name, lambda value=value: value)  # MOCK: Metal's driver
    manager = ModelManager([], select_placement())

    def runs_out():
        raise RuntimeError(mps_words)

    with pytest.raises(OutOfMemory, match="out of memory placing"):
        manager.out_of_memory_as_error(runs_out, "out of memory placing it")
    with pytest.raises(RuntimeError, match="same device"):  # any other error goes on as it was
        manager.out_of_memory_as_error(lambda: (_ for _ in ()).throw(RuntimeError("same device")), "x")


@pytest.mark.served
def test_a_device_that_is_not_there_stops_the_start_naming_the_setting(tiny_model, tmp_path):
    server = start_that_fails({"SDXL_MODELS": "tiny-sdxl", "SDXL_DEVICE": "mps"}, tmp_path / "server.log")
    assert server.process.returncode != 0
    assert "SDXL_DEVICE: device mps is not there" in server.log()
