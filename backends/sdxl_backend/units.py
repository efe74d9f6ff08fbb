"""A request's units: the side models it names, each with its weight and, for ControlNets and
IP-Adapters, the image it reads (A1111's ControlNet extension calls them units)."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from backends.sdxl_backend.image_bytes import TINY_PNG, ImageBytes

MAX_LORAS = 8  # per request


class LoraWeight(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="A served LoRA (GET /v1/loras).")
    weight: float = Field(1.0, ge=-4, le=4, description="How strongly it applies; 0: not at all.")


MAX_CONTROLNETS = 4  # per request
# A union ControlNet's control types (xinsir's ControlNet Union, ControlNetUnionModel), in the
# order of its task embedding, as ComfyUI's SetUnionControlNetType names them.
UnionControlType = Literal[
    "openpose",
    "depth",
    "hed/pidi/scribble/ted",
    "canny/lineart/anime_lineart/mlsd",
    "normal",
    "segment",
    "tile",
    "repaint",
]
UNION_CONTROL_TYPES: tuple[str, ...] = get_args(UnionControlType)


class ControlNetUnit(BaseModel):
    """One ControlNet and the image it reads. Several may guide one generation."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"example": {"id": "controlnet-canny-sdxl", "image": TINY_PNG, "preprocess": "canny"}},
    )

    id: str = Field(description="A served ControlNet (GET /v1/controlnets).")
    image: ImageBytes = Field(
        exclude=True,
        repr=False,
        description="The control image, base64: a control map (preprocess none), or a picture to preprocess.",
    )
    scale: float = Field(1.0, ge=0, le=2, description="How strongly it guides (0: not at all).")
    start: float = Field(0.0, ge=0, le=1, description="The part of the denoising where its guidance starts.")
    end: float = Field(1.0, ge=0, le=1, description="... and where it ends (above start).")
    preprocess: Literal["none", "canny"] = Field(
        "none", description="none: the image is the control map; canny: its Canny edges are."
    )
    low_threshold: int = Field(100, ge=0, le=255, description="canny: edges weaker than this are dropped.")
    high_threshold: int = Field(
        200, ge=0, le=255, description="canny: edges stronger than this are kept (weaker ones when joined to them)."
    )
    resize_mode: Literal["crop", "stretch", "fill"] = Field(
        "crop", description="How the image meets the output size: cover and crop, stretch, or fit and pad with black."
    )
    guess_mode: bool = Field(
        False,
        description="Guide from the image alone, the prompt weighing less (A1111's 'ControlNet is more "
        "important'); all units of a request agree.",
    )
    control_type: UnionControlType | None = Field(
        None,
        description="A union ControlNet's control type (ComfyUI's names), which it needs: what the image "
        "is. Not for a plain ControlNet, which reads one kind of map.",
    )


MAX_IP_ADAPTERS = 2  # per request


class IpAdapterUnit(BaseModel):
    """An image prompt: an IP-Adapter and the picture it reads (a style, a subject, a face)."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"example": {"id": "ip-adapter-sdxl", "image": TINY_PNG, "scale": 0.6}}
    )

    id: str = Field(description="A served IP-Adapter (GET /v1/ip-adapters).")
    image: ImageBytes = Field(exclude=True, repr=False, description="The picture it reads, base64.")
    scale: float = Field(
        0.6, ge=0, le=2, description="How much the picture weighs beside the text (0: not at all; 1: about as much)."
    )
