"""Upscale models: ESRGAN and its kin (Real-ESRGAN, SwinIR, HAT, DAT, SPAN...), through spandrel.

spandrel is the loader ComfyUI uses: it reads the architecture and its sizes from a state
dict's keys and shapes, so a file from any of the usual sources loads without a config. A
stored upscaler is a folder with its weights (`upscaler.safetensors`: a `.pth` is converted
when it is imported, so the server never unpickles) and a card (`upscaler.json`: the
architecture, its scale and the precisions it takes), read at import so that listings need no
load.

An upscale runs in tiles (`tile` pixels of the input, `overlap` pixels shared with each
neighbour, blended across it), so a 4x of a 1024 px image holds one tile's activations at a
time, not the whole picture's; between tiles the caller hears of progress and may stop it
(`on_tile` raising). A target larger than one pass reaches takes passes until it is covered,
then a Lanczos resize to the exact size, as AUTOMATIC1111 does.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (torch only where the device works: the store reads this module too)
    import torch
    from PIL import Image
    from spandrel import ImageModelDescriptor

    from backends.sdxl_backend.device import Placement

UPSCALER_FILE = "upscaler.safetensors"
UPSCALER_CARD = "upscaler.json"
UPSCALER_SUFFIXES = (".pth", ".pt", ".safetensors")
MAX_PASSES = 3  # a target beyond scale^3 of the input is refused before it is queued
TileObserver = Callable[[int, int], None]  # (tiles done, tiles in all): may raise to stop


@dataclass(frozen=True)
class Tiling:
    """How upscales are cut (SDXL_UPSCALE_TILE, SDXL_UPSCALE_TILE_OVERLAP): input pixels per
    tile side (0: never cut), and the pixels each tile shares with its neighbours."""

    tile: int = 512
    overlap: int = 32


@dataclass(frozen=True)
class UpscalerSource:
    id: str
    path: Path  # a folder holding UPSCALER_FILE and UPSCALER_CARD

    @cached_property
    def card(self) -> dict[str, Any]:
        return json.loads((self.path / UPSCALER_CARD).read_text())

    @property
    def scale(self) -> int:
        return int(self.card["scale"])


def is_torchscript(file: Path) -> bool:
    """A TorchScript archive (a zip with a `code/` folder): a program, which `torch.jit.load`
    would run, not weights. (torch.save's zips hold `data.pkl` and tensors, no code.)"""
    if not zipfile.is_zipfile(file):
        return False
    with zipfile.ZipFile(file) as archive:
        return any(name.split("/")[1:2] == ["code"] for name in archive.namelist())


def read_upscaler(file: Path) -> ImageModelDescriptor:
    """An upscale model file (`.pth`, `.pt` or `.safetensors`) as spandrel reads it (a pickle
    through its restricted unpickler, which builds tensors and nothing else); ValueError when it
    is not one (or is a face restorer, which needs face detection around it). A TorchScript
    `.pt` is refused before spandrel would hand it to `torch.jit.load`."""
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

    if file.suffix != ".safetensors" and is_torchscript(file):
        raise ValueError(f"{file.name} is a TorchScript archive (a program, not weights): save its state dict instead")
    try:
        descriptor = ModelLoader().load_from_file(file)
    except UnsupportedModelError:
        raise ValueError(f"{file.name} is not an upscale model spandrel knows") from None
    if not isinstance(descriptor, ImageModelDescriptor) or descriptor.purpose != "SR" or descriptor.scale < 2:
        raise ValueError(f"{file.name} is a {descriptor.architecture.name} model, not an upscaler")
    if (descriptor.input_channels, descriptor.output_channels) != (3, 3):
        raise ValueError(f"{file.name} is not an RGB upscaler")
    return descriptor


def save_upscaler(descriptor: ImageModelDescriptor, folder: Path) -> None:
    """The store's layout: the weights as safetensors, and the card."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().contiguous() for name, tensor in descriptor.model.state_dict().items()}
    save_file(weights, folder / UPSCALER_FILE)
    card = {
        "architecture": descriptor.architecture.name,
        "scale": descriptor.scale,
        "tags": descriptor.tags,
        "supports_half": descriptor.supports_half,
        "supports_bfloat16": descriptor.supports_bfloat16,
        "tiling": descriptor.tiling.name.lower(),
    }
    (folder / UPSCALER_CARD).write_text(json.dumps(card, indent=1))


def load_upscaler(path: Path, placement: Placement) -> ImageModelDescriptor:
    """A stored upscaler on the device: in the placement's half precision when its architecture
    takes it (some produce black or noisy images in half: spandrel knows which), else float32."""
    import torch

    descriptor = read_upscaler(path / UPSCALER_FILE)
    dtype = placement.dtype
    if (dtype == torch.float16 and not descriptor.supports_half) or (
        dtype == torch.bfloat16 and not descriptor.supports_bfloat16
    ):
        dtype = torch.float32
    return descriptor.to(placement.device, dtype).eval()


def passes_for(scale: int, size: tuple[int, int], target: tuple[int, int]) -> int:
    """How many passes of a `scale`x model cover `target` from `size` (at least one)."""
    ratio = max(target[0] / size[0], target[1] / size[1])
    return max(1, math.ceil(math.log(ratio, scale) - 1e-9)) if ratio > 1 else 1


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """The tiles along one side, (start, end): as few as cover it with tiles of at most `tile`
    overlapping by at least `overlap`, all of one size and evenly spread (so a side just over
    two tiles does not rerun most of the last one)."""
    if tile == 0 or length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (count - 1) * overlap) / count)
    starts = [round(index * (length - size) / (count - 1)) for index in range(count)]
    return [(start, start + size) for start in starts]


def tile_count(size: tuple[int, int], tile: int, overlap: int) -> int:
    return len(tile_spans(size[0], tile, overlap)) * len(tile_spans(size[1], tile, overlap))


def upscale(
    model: ImageModelDescriptor,
    image: Image.Image,
    target: tuple[int, int],
    tiling: Tiling,
    on_tile: TileObserver | None = None,
) -> Image.Image:
    """`image` upscaled by the model to cover `target` (passes of its scale), then resized to
    exactly `target`. A model that needs the whole picture (spandrel says so) is never cut."""
    from PIL import Image as PILImage
    from spandrel import ModelTiling

    tile, overlap = (0, 0) if model.tiling is ModelTiling.INTERNAL else (tiling.tile, tiling.overlap)
    sizes = [image.size]
    for _ in range(passes_for(model.scale, image.size, target) - 1):
        sizes.append((sizes[-1][0] * model.scale, sizes[-1][1] * model.scale))
    total, done = sum(tile_count(size, tile, overlap) for size in sizes), 0

    def count_tile() -> None:
        nonlocal done
        done += 1
        if on_tile is not None:
            on_tile(done, total)

    picture = image.convert("RGB")
    for _ in sizes:
        picture = _upscale_once(model, picture, tile, overlap, count_tile)
    if picture.size != target:
        picture = picture.resize(target, PILImage.Resampling.LANCZOS)
    return picture


def _upscale_once(
    model: ImageModelDescriptor, image: Image.Image, tile: int, overlap: int, count_tile: Callable[[], None]
) -> Image.Image:
    import numpy as np
    import torch
    from PIL import Image as PILImage

    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)
    pixels = pixels.to(model.device, model.dtype) / 255
    _, _, height, width = pixels.shape
    scale = model.scale
    if tile == 0 or (height <= tile and width <= tile):
        out = model(pixels).float()
        count_tile()
    else:
        out = torch.zeros(1, 3, height * scale, width * scale, device=model.device)
        weight = torch.zeros(1, 1, height * scale, width * scale, device=model.device)
        for top, bottom in tile_spans(height, tile, overlap):
            for left, right in tile_spans(width, tile, overlap):
                upscaled = model(pixels[:, :, top:bottom, left:right]).float()
                ramp = _blend_weight((top, bottom), (left, right), (height, width), overlap * scale, scale)
                ramp = ramp.to(model.device)
                rows, cols = slice(top * scale, bottom * scale), slice(left * scale, right * scale)
                out[:, :, rows, cols] += upscaled * ramp
                weight[:, :, rows, cols] += ramp
                count_tile()
        out /= weight
    array = (out[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return PILImage.fromarray(array)


def _blend_weight(
    rows: tuple[int, int], cols: tuple[int, int], whole: tuple[int, int], ramp: int, scale: int
) -> torch.Tensor:
    """A tile's weight in the blend, in output pixels: 1 inside, rising from near 0 across
    `ramp` pixels on each side that meets another tile (the picture's own edges stay at 1)."""
    import torch

    def along(span: tuple[int, int], whole_length: int) -> torch.Tensor:
        weights = torch.ones((span[1] - span[0]) * scale)
        if ramp == 0:
            return weights
        rise = (torch.arange(ramp) + 0.5) / ramp
        if span[0] > 0:
            weights[:ramp] = rise
        if span[1] < whole_length:
            weights[-ramp:] = torch.minimum(weights[-ramp:], rise.flip(0))
        return weights

    return (along(rows, whole[0])[:, None] * along(cols, whole[1])[None, :])[None, None]
