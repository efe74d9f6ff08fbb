"""The one place that decides where models run and in which precision, and the one place that
asks torch about a device: CUDA (NVIDIA, and AMD through torch's ROCm build, which calls itself
`cuda`), Apple Silicon (`mps`), Intel (`xpu`) or the CPU. Nothing else in the server calls a
device family's own module (`torch.cuda`, `torch.mps`, `torch.xpu`), so no CUDA call ever runs
on a machine without CUDA."""

from __future__ import annotations

import gc
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import psutil
import torch

from backends.sdxl_backend.errors import OutOfMemory

T = TypeVar("T")

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
AUTO_ORDER = ("cuda", "mps", "xpu")  # what `auto` tries, in order, before the CPU
# How each family says it ran out of memory, besides torch.OutOfMemoryError (CUDA's and XPU's).
OUT_OF_MEMORY_WORDS = ("MPS backend out of memory", "XPU out of memory")


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    def describe(self) -> str:
        return f"{self.device} ({device_name(self.device)}), {str(self.dtype).removeprefix('torch.')}"


def available(family: str) -> bool:
    """Whether torch can use that family of devices here."""
    if family == "cuda":
        return torch.cuda.is_available()
    if family == "mps":
        return torch.backends.mps.is_available()
    if family == "xpu":
        return hasattr(torch, "xpu") and torch.xpu.is_available()
    return family == "cpu"


def device_count(family: str) -> int:
    """The devices of that family torch sees (0 when it has none)."""
    if not available(family):
        return 0
    if family == "cuda":
        return torch.cuda.device_count()
    if family == "xpu":
        return torch.xpu.device_count()
    return 1


def select_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """ "auto": CUDA, else Apple's GPU (MPS), else Intel's (XPU), else the CPU. A device named
    that is not there is a ValueError saying what is.

    Precision, by default: on CUDA bfloat16 where the card supports it (the SDXL VAE is stable
    in it), else float16 (the pipeline then upcasts the VAE for decoding, as SDXL's VAE config
    asks); on MPS float16, with that same upcast (bfloat16 there depends on the macOS release
    and is slower where it exists); on XPU bfloat16, which every Arc card runs; on the CPU
    float32 (half precision there is slow and poorly supported)."""
    if device == "auto":
        device = next((family for family in AUTO_ORDER if available(family)), "cpu")
    target = torch.device(device)
    if not available(target.type) or (target.index is not None and target.index >= device_count(target.type)):
        found = ", ".join(f"{family}: {device_count(family)}" for family in AUTO_ORDER)
        raise ValueError(f"device {device} is not there ({found})")
    if dtype == "auto":
        if target.type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = {"mps": "float16", "xpu": "bfloat16"}.get(target.type, "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return Placement(target, DTYPES[dtype])


def device_name(device: torch.device) -> str:
    """The device as its maker names it (ROCm's AMD cards included, which torch calls `cuda`)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "xpu":
        return torch.xpu.get_device_name(device)
    if device.type == "mps":
        return f"Apple GPU ({platform.machine()})"
    return platform.processor() or "cpu"


def device_vendor(device: torch.device) -> str:
    """Who makes it, as torch knows it: its ROCm build says AMD, never NVIDIA-only tools."""
    if device.type == "cuda":
        return "AMD" if torch.version.hip else "NVIDIA"
    return {"mps": "Apple", "xpu": "Intel"}.get(device.type, "cpu")


def device_memory(placement: Placement) -> tuple[int, int] | None:
    """(used, total) bytes of the device as its driver sees it; None on the CPU, which has no
    device memory of its own to report. On MPS the memory is the host's, shared: used is what
    Metal's driver holds for this process, total what it recommends a process stays under."""
    device = placement.device
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total - free, total
    if device.type == "xpu":
        free, total = torch.xpu.mem_get_info(device)
        return total - free, total
    if device.type == "mps":
        return torch.mps.driver_allocated_memory(), torch.mps.recommended_max_memory()
    return None


def memory_in_use(placement: Placement) -> tuple[int, int]:
    """(used, total) bytes of the device, or on the CPU of the host's memory."""
    memory = device_memory(placement)
    if memory is None:
        host = psutil.virtual_memory()
        memory = (host.total - host.available, host.total)
    return memory


def allocated_memory(placement: Placement) -> int:
    """What this process's tensors hold on the device (on the CPU: its resident memory)."""
    device = placement.device
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    if device.type == "xpu":
        return torch.xpu.memory_allocated(device)
    if device.type == "mps":
        return torch.mps.current_allocated_memory()
    return psutil.Process().memory_info().rss


def empty_cache(device: torch.device) -> None:
    """Hand the device's cached, unused blocks back to its driver (nothing to do on the CPU)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "xpu":
        torch.xpu.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is the device running out of memory: torch's OutOfMemoryError (CUDA,
    XPU), or MPS's RuntimeError, which says so in words."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(words in str(error) for words in OUT_OF_MEMORY_WORDS)
    )


def free_cached_memory(device: torch.device) -> None:
    """What Python and torch's allocator hold for nothing, given back (a model left, a call failed)."""
    gc.collect()
    empty_cache(device)


def out_of_memory_as_error(action: Callable[[], T], message: str, device: torch.device) -> T:
    """Run `action` on `device`; the device running out of memory (CUDA's, XPU's or MPS's way of
    saying it) comes out as `OutOfMemory`, once what the failed call held is freed."""
    try:
        return action()
    except (torch.OutOfMemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
    # (out of the except block first: its traceback holds the failed call's tensors)
    free_cached_memory(device)
    raise OutOfMemory(message)


def placement_status(placement: Placement) -> dict:
    """The device as the status routes show it."""
    return {
        "device": str(placement.device),
        "device_name": placement.describe(),
        "device_vendor": device_vendor(placement.device),
        "dtype": str(placement.dtype).removeprefix("torch."),
    }
