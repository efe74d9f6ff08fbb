"""A pipeline call's arguments that depend on its task and its requests: the images and their
strength, the size, the ControlNets' maps, and one seeded generator per image."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from backends.sdxl_backend.units import UNION_CONTROL_TYPES

if TYPE_CHECKING:
    from collections.abc import Callable

    from backends.sdxl_backend.generation.prepared import PreparedRequest


def control_arguments(prepared: PreparedRequest, task: str) -> dict[str, Any]:
    """The ControlNet arguments of a pipeline call. The maps go in "image" in text-to-image
    (where `image` is not taken), else in "control_image". diffusers takes plain values for one
    ControlNet and lists for several; a union ControlNet (guiding alone) takes its maps and
    their control types (`control_mode`, the indices) as lists, in "control_image" always."""
    units = prepared.request.controlnets
    if units[0].control_type is not None:
        return {
            "control_image": list(prepared.controls),
            "control_mode": [UNION_CONTROL_TYPES.index(unit.control_type or "") for unit in units],
            "controlnet_conditioning_scale": units[0].scale,
            "control_guidance_start": units[0].start,
            "control_guidance_end": units[0].end,
            "guess_mode": units[0].guess_mode,
        }

    def each(values: list) -> list | object:
        return values if len(units) > 1 else values[0]

    return {
        "image" if task == "txt2img" else "control_image": each(prepared.controls),
        "controlnet_conditioning_scale": each([unit.scale for unit in units]),
        "control_guidance_start": each([unit.start for unit in units]),
        "control_guidance_end": each([unit.end for unit in units]),
        "guess_mode": units[0].guess_mode,
    }


def per_image(members: list[PreparedRequest], values: Callable[[PreparedRequest], Any]) -> list:
    """One value per image of the call: each request's, repeated for its `n` images."""
    return [values(prepared) for prepared in members for _ in range(prepared.request.n)]


def generators(members: list[PreparedRequest]) -> list[torch.Generator]:
    """One generator per image. CPU generators: the same seed gives the same noise whatever the device."""
    return [torch.Generator("cpu").manual_seed(seed) for prepared in members for seed in prepared.seeds]


def txt2img_arguments(members: list[PreparedRequest]) -> dict[str, Any]:
    request = members[0].request
    arguments: dict[str, Any] = {"width": request.width, "height": request.height}
    if request.hires_fix is not None:  # the second pass takes the first's latents, or its images
        arguments.update(output_type="latent" if request.hires_fix.upscaler == "latent" else "pil")
    return arguments


def img2img_arguments(members: list[PreparedRequest]) -> dict[str, Any]:
    return {"image": per_image(members, lambda prepared: prepared.init_image), "strength": members[0].request.strength}


def inpaint_arguments(members: list[PreparedRequest]) -> dict[str, Any]:
    (first,) = members  # (alone: the crop path takes one image and one mask)
    request = first.request
    return {
        "image": first.init_image,
        "mask_image": first.mask,
        "strength": request.strength,
        "width": request.width,
        "height": request.height,
        "padding_mask_crop": request.masked_area_padding if request.masked_area_only else None,
    }


TASK_ARGUMENTS = {"txt2img": txt2img_arguments, "img2img": img2img_arguments, "inpaint": inpaint_arguments}
