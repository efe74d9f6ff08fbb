"""LoRAs: which served LoRA fits which model (plain Python: the store and the settings read it
without loading torch). The model manager loads them into a model's pipelines
(`ModelManager.apply_loras`); a request names them in `loras`.

A LoRA is trained against one UNet architecture; it fits every model of that architecture
(SDXL base and its fine-tunes share one; the refiner's is another, tiny-sdxl's another). The
architecture is recorded as a signature of the UNet's config, for models read from their
`unet/config.json`, for LoRAs written as the `fits` label at import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backends.sdxl_backend.protocol import SamplingProfile

LORA_FILE = "pytorch_lora_weights.safetensors"  # what a stored LoRA's folder holds, whatever it came as
# Where a LoRA's text-encoder weights are: diffusers' names, and kohya's (the files people share).
TEXT_ENCODER_PREFIXES = ("text_encoder", "lora_te")
SDXL_UNET = "320,640,1280/2048"  # SDXL base's signature: what hub and single-file LoRAs are trained on


def unet_signature(config: dict) -> str:
    """The UNet's block widths and text-conditioning width: what a LoRA's shapes depend on."""
    return ",".join(str(width) for width in config["block_out_channels"]) + f"/{config['cross_attention_dim']}"


def model_unet_signature(path: Path) -> str:
    """A stored pipeline's signature."""
    return unet_signature(json.loads((path / "unet" / "config.json").read_text()))


@dataclass(frozen=True)
class LoraSource:
    id: str
    path: Path  # a folder holding LORA_FILE
    fits: str  # the UNet signature it was trained on
    sampling: SamplingProfile | None = None  # a few-step LoRA's, from its catalog entry

    @property
    def file(self) -> Path:
        return self.path / LORA_FILE

    @property
    def adapter_name(self) -> str:
        """PEFT adapter names end up in module keys, where a dot would split them."""
        return self.id.replace(".", "_")


@lru_cache(maxsize=256)
def holds_text_encoder_weights(lora_file: Path) -> bool:
    """Whether a LoRA file has weights for the text encoders too (many kohya LoRAs do; those
    trained on the UNet alone do not), from its tensors' names (the header alone is read). A
    stored file never changes: its path holds the store version."""
    from safetensors import safe_open

    with safe_open(str(lora_file), framework="numpy") as weights:
        return any(name.startswith(TEXT_ENCODER_PREFIXES) for name in weights.keys())
