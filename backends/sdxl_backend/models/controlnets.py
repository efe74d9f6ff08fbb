"""ControlNets: control maps from request images, and the ControlNet pipelines that take them.

A ControlNet is a copy of a UNet's encoder trained to read a control image (edges, depth,
pose...) and add what it reads to the UNet's features; it fits every model of the UNet
architecture it was made from (loras.py's signature). Stored ControlNets are loaded and kept
by the model manager; a request names them in `controlnets`, each with its image, which
`control_map()` turns into the map the ControlNet reads: sized to the output the way the
request asks, then run through its preprocessor (`canny`: OpenCV's Canny edge detector, as
AUTOMATIC1111's ControlNet extension does) or taken as it is (`none`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from backends.sdxl_backend.units import ControlNetUnit

PREPROCESSORS = ("none", "canny")


@dataclass(frozen=True)
class ControlNetSource:
    id: str
    path: Path  # a ControlNetModel's directory: config.json and its weights
    fits: str  # the UNet signature it was made from (loras.py)

    @property
    def control_types(self) -> int:
        """0 for a plain ControlNet; a union ControlNet's number of control types."""
        return union_control_types(self.path)


@lru_cache(maxsize=64)
def union_control_types(path: Path) -> int:
    """A union ControlNet (xinsir's ControlNet Union: one model for pose, depth, edges, tile...)
    carries a task embedding, one row per control type; a plain one has none: 0. Read from the
    weights' header (a stored folder never changes: its path holds the store version)."""
    from safetensors import safe_open

    for weights_file in sorted(path.glob("*.safetensors")):
        with safe_open(str(weights_file), framework="numpy") as weights:
            if "task_embedding" in weights.keys():
                return int(weights.get_slice("task_embedding").get_shape()[0])
    return 0


def control_map(image: Image.Image, unit: ControlNetUnit, size: tuple[int, int]) -> Image.Image:
    """The map the ControlNet reads for `unit`, `size` pixels: `stretch` resizes to it,
    `crop` covers it and cuts the overflow (centred), `fill` fits inside it and pads with
    black (no edge, no depth); then the preprocessor."""
    if unit.resize_mode == "stretch":
        sized = image.resize(size, Image.Resampling.LANCZOS)
    elif unit.resize_mode == "crop":
        sized = ImageOps.fit(image, size, Image.Resampling.LANCZOS)
    else:
        sized = ImageOps.pad(image, size, Image.Resampling.LANCZOS, color=(0, 0, 0))
    if unit.preprocess == "canny":
        import cv2  # (only here: OpenCV loads in a second, and only canny needs it)

        edges = cv2.Canny(np.asarray(sized.convert("RGB")), unit.low_threshold, unit.high_threshold)
        return Image.fromarray(edges).convert("RGB")
    return sized.convert("RGB")
