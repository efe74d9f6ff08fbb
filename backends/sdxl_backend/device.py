"""The one place that decides where models run and in which precision."""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return f"{self.device} ({name}), {str(self.dtype).removeprefix('torch.')}"


def select_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """ "auto": CUDA when present, else CPU.

    On CUDA the default is bfloat16 where the card supports it (the SDXL VAE is stable in it),
    else float16 (the pipeline then upcasts the VAE for decoding, as SDXL's VAE config asks).
    On CPU it is float32: half precision there is slow and poorly supported.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if dtype == "auto":
        if target.type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return Placement(target, DTYPES[dtype])


def device_memory(placement: Placement) -> tuple[int, int] | None:
    """(used, total) bytes of the device as the driver sees it, all processes included;
    None on the CPU, which has no device memory of its own to report."""
    if placement.device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(placement.device)
    return total - free, total


def memory_in_use(placement: Placement) -> tuple[int, int]:
    """(used, total) bytes of the device, or on the CPU of the host's memory."""
    memory = device_memory(placement)
    if memory is None:
        host = psutil.virtual_memory()
        memory = (host.total - host.available, host.total)
    return memory


def allocated_memory(placement: Placement) -> int:
    """What this process's tensors hold on the device (on the CPU: its resident memory)."""
    if placement.device.type == "cuda":
        return torch.cuda.memory_allocated(placement.device)
    return psutil.Process().memory_info().rss
