"""The speed settings a loaded model's components can take, applied once when it loads.

Plain Python at import (the settings read it in BentoML's light main process); torch, and
torchao when quantizing, load where the settings are applied, and bench/gpu_sdxl.py applies
them exactly as the service does. Each is a setting (`SDXL_ATTENTION`, `SDXL_FUSE_QKV`,
`SDXL_CHANNELS_LAST`, `SDXL_QUANTIZE`, `SDXL_COMPILE`); docs/features/speed.md says what each costs and
gives, and which are on by default and why.

Order matters: attention processors first (fusing installs its own), then the fused
projections (quantizing must see the fused layers), the memory format, quantization, and
compilation last, over the final modules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline, UNet2DConditionModel

logger = logging.getLogger(__name__)

Attention = Literal["sdpa", "eager"]
Quantization = Literal["none", "int8", "fp8"]


@dataclass(frozen=True)
class FastPaths:
    # "sdpa": torch's fused scaled-dot-product attention (flash or memory-efficient kernels on
    # a GPU; diffusers' default); "eager": plain matmul and softmax, the reference to compare with.
    attention: Attention = "sdpa"
    # One matmul for query, key and value (self-attention; key and value for cross-attention).
    # The unfused weights stay (diffusers keeps them to unfuse), so it costs memory.
    fuse_qkv: bool = False
    # UNet and VAE in NHWC layout, which cuDNN's convolutions prefer on tensor-core cards.
    channels_last: bool = False
    # The UNet's linear weights in int8 or fp8 (torchao): about half the memory of bfloat16.
    # fp8 on a card with fp8 arithmetic (compute capability 8.9+: Ada, Hopper) also computes in
    # fp8; elsewhere it only stores the weights in fp8.
    quantize: Quantization = "none"
    # torch.compile of the UNet and the VAE decoder, compiled by the first call at each new
    # shape (the warm-up makes the first); inductor's cache keeps the result across restarts.
    compile: bool = False

    def __post_init__(self) -> None:
        if self.fuse_qkv and self.attention != "sdpa":
            raise ValueError("fused QKV projections run on SDPA attention: set attention to sdpa")

    def describe(self) -> str:
        on = [f"attention {self.attention}"]
        on += [name for name in ("fuse_qkv", "channels_last", "compile") if getattr(self, name)]
        on += [f"quantize {self.quantize}"] if self.quantize != "none" else []
        return ", ".join(on)


def apply_fast_paths(pipeline: DiffusionPipeline, fast: FastPaths) -> None:
    """Apply `fast` to the pipeline's UNet and VAE, in place (every pipeline sharing these
    modules gets them)."""
    import torch

    unet, vae = pipeline.unet, pipeline.vae
    if fast.attention == "eager":
        unet.set_default_attn_processor()
        vae.set_default_attn_processor()
    if fast.fuse_qkv:
        unet.fuse_qkv_projections()
        vae.fuse_qkv_projections()
    if fast.channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if fast.quantize != "none":
        quantize_unet(unet, fast.quantize)
    if fast.compile:
        unet.compile()
        vae.decoder.compile()


def quantize_unet(unet: UNet2DConditionModel, quantization: Quantization) -> None:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    if quantization == "int8":
        config = Int8WeightOnlyConfig()
    elif fp8_arithmetic(unet.device):
        config = Float8DynamicActivationFloat8WeightConfig()
    else:
        logger.info(
            "fp8: no fp8 arithmetic on %s, so the weights are stored in fp8 and computed in %s",
            unet.device,
            str(unet.dtype).removeprefix("torch."),
        )
        config = Float8WeightOnlyConfig()
    quantize_(unet, config)


def fp8_arithmetic(device: torch.device) -> bool:
    import torch

    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
