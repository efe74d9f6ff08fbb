"""AUTOMATIC1111's infotext: the generation parameters as text, which image tools read from a
PNG's `parameters` chunk ("prompt\nNegative prompt: ...\nSteps: 20, Sampler: Euler a, ...").
The engine writes it into every PNG it makes; the A1111 dialect's /png-info parses it back."""

from __future__ import annotations

import re
from typing import Any

from backends.sdxl_backend.models.schedulers import SCHEDULERS
from backends.sdxl_backend.protocol import ResolvedRequest


def write(request: ResolvedRequest, seed: int, img2img: bool, inpainting: bool) -> str:
    """The generation parameters in AUTOMATIC1111's format, which image tools parse."""
    # LoRAs as A1111 keeps them, tags in the prompt (weight 0 too: listed as asked).
    lines = [" ".join([request.prompt, *(f"<lora:{lora.id}:{lora.weight:g}>" for lora in request.loras)])]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    settings = [
        f"Steps: {request.steps}",
        f"Sampler: {SCHEDULERS[request.scheduler].label}",
        f"CFG scale: {request.guidance_scale}",
        f"Seed: {seed}",
        f"Size: {request.width}x{request.height}",
        f"Model: {request.model}",
    ]
    if request.clip_skip > 1:  # (as A1111 writes it: from 2 on)
        settings.append(f"Clip skip: {request.clip_skip}")
    if request.guidance_rescale:  # (as A1111's CFG Rescale extension writes it)
        settings.append(f"CFG Rescale: {request.guidance_rescale}")
    if request.pag_scale:  # (as Forge's built-in PAG script names its scale)
        settings.append(f"PAG Scale: {request.pag_scale}")
    if request.freeu is not None:
        freeu = request.freeu
        settings.append(f"FreeU s1: {freeu.s1}, FreeU s2: {freeu.s2}, FreeU b1: {freeu.b1}, FreeU b2: {freeu.b2}")
    if img2img:
        settings.append(f"Denoising strength: {request.strength}")
    if request.hires_fix and not img2img:
        hires = request.hires_fix
        # (an upscale model by its id)
        upscaler = hires.upscaler.title() if hires.upscaler in ("latent", "lanczos") else hires.upscaler
        settings.append(
            f"Hires resize: {hires.width}x{hires.height}, Hires steps: {hires.steps}, "
            f"Hires upscaler: {upscaler}, Denoising strength: {hires.strength}"
        )
    if request.refiner:
        settings.append(f"Refiner: {request.refiner.model}, Refiner switch at: {request.refiner.switch_at}")
    # The units, as A1111's ControlNet extension writes them (it runs image prompts as units too).
    units: list[tuple[str, str, float, float, float]] = [
        (unit.preprocess, unit.id, unit.scale, unit.start, unit.end) for unit in request.controlnets
    ]
    units += [("ip-adapter-auto", unit.id, unit.scale, 0.0, 1.0) for unit in request.ip_adapters]
    for index, (module, model, weight, start, end) in enumerate(units):
        settings.append(
            f'ControlNet {index}: "Module: {module}, Model: {model}, Weight: {weight}, '
            f'Guidance Start: {start}, Guidance End: {end}"'
        )
    if inpainting:
        settings.append(f"Mask blur: {request.mask_blur}")
        if request.masked_area_only:
            settings.append(f"Inpaint area: Only masked, Masked area padding: {request.masked_area_padding}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def parse(text: str) -> dict[str, Any]:
    """A1111's infotext ("prompt\nNegative prompt: ...\nSteps: 20, Sampler: Euler, ...")."""
    if not text:
        return {}
    *prompt_lines, settings = text.split("\n")
    if not re.match(r"^[\w ]+: ", settings):  # no settings line: all of it is prompt
        prompt_lines, settings = [*prompt_lines, settings], ""
    negative = [line for line in prompt_lines if line.startswith("Negative prompt: ")]
    parsed: dict[str, Any] = {
        "Prompt": "\n".join(line for line in prompt_lines if not line.startswith("Negative prompt: ")),
        "Negative prompt": negative[0].removeprefix("Negative prompt: ") if negative else "",
    }
    for key, value in re.findall(r"\s*([\w ]+): ([^,]+)(?:,|$)", settings):
        parsed[key.strip()] = value.strip()
    if "Size" in parsed and "x" in parsed["Size"]:
        parsed["Size-1"], parsed["Size-2"] = parsed["Size"].split("x", 1)
    return parsed
