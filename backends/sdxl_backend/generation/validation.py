"""A request filled in and checked against the limits, before anything is queued
(`Engine.prepare`): a bad one fails here, at once, with the field it names."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from PIL import Image

from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.generation.masks import outpainted
from backends.sdxl_backend.limits import Limits
from backends.sdxl_backend.models.schedulers import ETA_SCHEDULERS, SCHEDULERS
from backends.sdxl_backend.protocol import (
    MAX_SEED,
    GenerationRequest,
    ModelDefaults,
    ResolvedHiresFix,
    ResolvedRequest,
    SamplingProfile,
)
from backends.sdxl_backend.units import UNION_CONTROL_TYPES, ControlNetUnit

if TYPE_CHECKING:
    from backends.sdxl_backend.models.manager import ModelManager
    from backends.sdxl_backend.models.records import ModelSource


def first_pass_size(request: ResolvedRequest) -> tuple[int, int]:
    """The size a resolved request's first pass makes (its input's, for img2img)."""
    return request.width, request.height


def output_size(request: ResolvedRequest) -> tuple[int, int]:
    """The size of the images a resolved request makes: its own, or its hires fix's."""
    hires = request.hires_fix
    return (hires.width, hires.height) if hires else (request.width, request.height)


def resolve(
    request: GenerationRequest,
    model_id: str,
    defaults: ModelDefaults,
    init_image: Image.Image | None,
    profile: tuple[str, SamplingProfile] | None = None,
) -> ResolvedRequest:
    """The request with every open field filled: a few-step LoRA's sampling profile (`profile`:
    the LoRA and its profile) for the scheduler, steps, guidance and eta, then the model's
    defaults, or for img2img the input image's size (rounded down to a multiple of 8), and a
    random seed."""
    width, height = defaults.width, defaults.height
    if init_image is not None:
        width, height = init_image.width // 8 * 8, init_image.height // 8 * 8
    width = width if request.width is None else request.width
    height = height if request.height is None else request.height
    sampling: dict[str, Any] = {}
    profile_lora = None
    if profile is not None:
        profile_lora, fields = profile
        sampling = {k: v for k, v in dict(fields).items() if v is not None and getattr(request, k) is None}
        if request.scheduler not in (None, fields.scheduler):  # (its eta is its scheduler's)
            sampling.pop("eta", None)
    steps = sampling.get("steps", defaults.steps) if request.steps is None else request.steps
    filled: dict[str, Any] = {
        "model": model_id,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance_scale": sampling.get("guidance_scale", defaults.guidance_scale)
        if request.guidance_scale is None
        else request.guidance_scale,
        "scheduler": request.scheduler or sampling.get("scheduler", defaults.scheduler),
        "eta": sampling.get("eta", request.eta),
        "sampling_profile": profile_lora if sampling else None,
        "clip_skip": request.clip_skip or defaults.clip_skip,
        "guidance_rescale": defaults.guidance_rescale if request.guidance_rescale is None else request.guidance_rescale,
        "seed": secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed,
    }
    if request.hires_fix is not None:
        hires = request.hires_fix
        filled["hires_fix"] = ResolvedHiresFix.model_construct(
            hires.model_fields_set | {"width", "height", "steps"},
            **{
                **dict(hires),
                "width": hires.width or int(width * hires.scale) // 8 * 8,
                "height": hires.height or int(height * hires.scale) // 8 * 8,
                "steps": hires.steps or steps,
            },
        )
    # (Constructed, not validated again: the fields were checked, and the images are bytes now.)
    return ResolvedRequest.model_construct(request.model_fields_set | set(filled), **{**dict(request), **filled})


def check_size(width: int, height: int, limits: Limits, prefix: str = "") -> None:
    for name, value in ((f"{prefix}width", width), (f"{prefix}height", height)):
        if value % 8:
            raise InvalidRequest(f"{name}: {value} is not a multiple of 8", name)
        if not limits.min_side <= value <= limits.max_side:
            raise InvalidRequest(f"{name}: {value} is outside {limits.min_side}..{limits.max_side}", name)
    if width * height > limits.max_pixels:
        raise InvalidRequest(
            f"{prefix}width x {prefix}height: {width}x{height} is over the limit of {limits.max_pixels} pixels",
            f"{prefix}width",
        )


def validate(request: ResolvedRequest, limits: Limits) -> None:
    """Every check that does not need the model, with the field named in the message."""
    _check_bounds(request, limits)
    _check_sampling(request)
    if request.image is not None and int(request.steps * request.strength) < 1:  # before the image is dropped
        raise InvalidRequest(
            f"strength: {request.strength} x {request.steps} steps leaves no step to run; raise either",
            "strength",
        )
    _check_control_units(request)
    _check_hires_fix(request, limits)


def _check_bounds(request: ResolvedRequest, limits: Limits) -> None:
    """The prompt is there, and the sizes, counts and lengths are within the server's limits."""
    if not request.prompt and request.image is None:
        raise InvalidRequest("prompt: required (only a variation of an input image may go without one)", "prompt")
    check_size(request.width, request.height, limits)
    if request.steps > limits.max_steps:
        raise InvalidRequest(f"steps: {request.steps} is over the limit of {limits.max_steps}", "steps")
    if request.guidance_scale > limits.max_guidance_scale:
        raise InvalidRequest(
            f"guidance_scale: {request.guidance_scale} is over the limit of {limits.max_guidance_scale}",
            "guidance_scale",
        )
    if request.n > limits.max_images:
        raise InvalidRequest(f"n: {request.n} is over the limit of {limits.max_images} images", "n")
    for name in ("prompt", "negative_prompt"):
        length = len(getattr(request, name))
        if length > limits.max_prompt_chars:
            raise InvalidRequest(f"{name}: {length} characters is over the limit of {limits.max_prompt_chars}", name)


def _check_sampling(request: ResolvedRequest) -> None:
    """The scheduler is known, and the guidance settings go together with the rest."""
    if request.scheduler not in SCHEDULERS:
        raise InvalidRequest(
            f"scheduler: unknown scheduler '{request.scheduler}'; known: {', '.join(SCHEDULERS)}", "scheduler"
        )
    if request.eta is not None and request.scheduler not in ETA_SCHEDULERS:
        raise InvalidRequest(
            f"eta: only the {' and '.join(ETA_SCHEDULERS)} schedulers take eta, not {request.scheduler}", "eta"
        )
    if request.pag_scale:
        for other, why in (
            ("ip_adapters", "image prompts replace the attention PAG perturbs"),
            ("refiner", "the refiner's pass runs without it"),
        ):
            if getattr(request, other):
                raise InvalidRequest(f"pag_scale: not with {other} here ({why})", "pag_scale")
        if request.controlnets and (request.mask is not None or request.controlnets[0].control_type is not None):
            raise InvalidRequest(
                "pag_scale: not with ControlNets when inpainting, nor with a union ControlNet (no such "
                "diffusers pipeline)",
                "pag_scale",
            )
    if request.guidance_rescale and request.controlnets:
        raise InvalidRequest(
            "guidance_rescale: not with ControlNets (diffusers' SDXL ControlNet pipelines do not take it)",
            "guidance_rescale",
        )


def _check_control_units(request: ResolvedRequest) -> None:
    """Each ControlNet unit is sound, and the units agree with one another and the request."""
    for index, unit in enumerate(request.controlnets):
        if unit.end <= unit.start:
            raise InvalidRequest(
                f"controlnets[{index}].end: {unit.end} is not after start ({unit.start})", f"controlnets[{index}].end"
            )
        if unit.guess_mode != request.controlnets[0].guess_mode:
            raise InvalidRequest(
                "controlnets: guess_mode applies to the whole generation; give every unit the same",
                f"controlnets[{index}].guess_mode",
            )
        if unit.preprocess == "canny" and unit.low_threshold > unit.high_threshold:
            raise InvalidRequest(
                f"controlnets[{index}].low_threshold: {unit.low_threshold} is above high_threshold "
                f"({unit.high_threshold})",
                f"controlnets[{index}].low_threshold",
            )
    if request.controlnets and request.refiner is not None and request.image is not None:
        raise InvalidRequest(
            "controlnets: with a refiner, text-to-image only (diffusers' ControlNet image-to-image "
            "cannot hand over to a refiner)",
            "controlnets",
        )


def _check_hires_fix(request: ResolvedRequest, limits: Limits) -> None:
    """A hires fix's second pass: txt2img only, larger than the first, within the limits."""
    hires = request.hires_fix
    if hires is None:
        return
    if request.image is not None:
        raise InvalidRequest("hires_fix: txt2img only (an img2img request sets its size from its image)", "hires_fix")
    check_size(hires.width, hires.height, limits, "hires_fix.")
    if hires.width < request.width or hires.height < request.height:
        raise InvalidRequest(
            f"hires_fix: {hires.width}x{hires.height} is smaller than the first pass's "
            f"{request.width}x{request.height}",
            "hires_fix",
        )
    if hires.steps > limits.max_steps:
        raise InvalidRequest(
            f"hires_fix.steps: {hires.steps} is over the limit of {limits.max_steps}", "hires_fix.steps"
        )
    if int(hires.steps * hires.strength) < 1:
        raise InvalidRequest(
            f"hires_fix.strength: {hires.strength} x {hires.steps} steps leaves no step to run",
            "hires_fix.strength",
        )


def sampling_profile(models: ModelManager, request: GenerationRequest) -> tuple[str, SamplingProfile] | None:
    """The sampling profile of a few-step LoRA the request names (at a weight other than 0),
    with its id. Two LoRAs with different profiles are a 400, unless the request names every
    field they would fill."""
    profiles = {
        lora.id: models.loras[lora.id].sampling
        for lora in request.loras
        if lora.weight != 0 and lora.id in models.loras and models.loras[lora.id].sampling is not None
    }
    if len(set(profiles.values())) > 1 and None in (request.scheduler, request.steps, request.guidance_scale):
        raise InvalidRequest(
            f"loras: {' and '.join(profiles)} are each sampled their own way; name scheduler, steps and guidance_scale",
            "loras",
        )
    return next(((lora_id, profile) for lora_id, profile in profiles.items() if profile is not None), None)


def check_loras(models: ModelManager, source: ModelSource, lora_ids: list[str]) -> None:
    """A request's LoRAs are served, named once each, and fit the model; raises
    `InvalidRequest` naming the one at fault."""
    if lora_ids and models.fast_paths.fuse_qkv:
        raise InvalidRequest(
            "loras: this server fuses the attention projections (SDXL_FUSE_QKV=1), which LoRAs would not reach",
            "loras",
        )
    for lora_id in lora_ids:
        if lora_id not in models.loras:
            raise InvalidRequest(
                f"loras: unknown LoRA '{lora_id}' (served: {', '.join(models.loras) or 'none'}; GET /v1/loras)",
                "loras",
            )
        if lora_ids.count(lora_id) > 1:
            raise InvalidRequest(f"loras: '{lora_id}' is named twice", "loras")
        if models.loras[lora_id].fits != source.unet_signature:
            raise InvalidRequest(
                f"loras: '{lora_id}' does not fit model '{source.id}' (it was trained on another UNet architecture)",
                "loras",
            )


def check_controlnets(models: ModelManager, source: ModelSource, units: list[ControlNetUnit]) -> None:
    """A request's ControlNets are served and fit the model, and a union ControlNet is told its
    control type (one it has) and guides alone; raises `InvalidRequest` naming the one at fault."""
    _check_fitting("controlnets", "ControlNet", models.controlnets, source, [unit.id for unit in units])
    for index, unit in enumerate(units):
        types = models.controlnets[unit.id].control_types
        field = f"controlnets[{index}].control_type"
        if types and unit.control_type is None:
            raise InvalidRequest(f"{field}: '{unit.id}' is a union ControlNet: say what the image is", field)
        if not types and unit.control_type is not None:
            raise InvalidRequest(f"{field}: '{unit.id}' reads one kind of map; a union ControlNet takes this", field)
        if types and UNION_CONTROL_TYPES.index(unit.control_type or "") >= types:
            raise InvalidRequest(
                f"{field}: '{unit.id}' knows the first {types} types ({', '.join(UNION_CONTROL_TYPES[:types])})", field
            )
        if types and len(units) > 1:
            raise InvalidRequest(f"controlnets: the union ControlNet '{unit.id}' guides alone here", "controlnets")


def check_ip_adapters(models: ModelManager, source: ModelSource, adapter_ids: list[str]) -> None:
    """A request's IP-Adapters are served, named once each (one set of layers each in the
    UNet), and fit the model; raises `InvalidRequest` naming the one at fault."""
    _check_fitting("ip_adapters", "IP-Adapter", models.ip_adapters, source, adapter_ids)
    for index, adapter_id in enumerate(adapter_ids):
        if adapter_ids.index(adapter_id) != index:
            raise InvalidRequest(
                f"ip_adapters[{index}].id: '{adapter_id}' is named twice; give it one picture",
                f"ip_adapters[{index}].id",
            )


def _check_fitting(field: str, noun: str, served: Mapping[str, Any], source: ModelSource, ids: list[str]) -> None:
    """Each of `ids` names one of `served` (sources with a `fits` UNet signature) that fits `source`."""
    for index, unit_id in enumerate(ids):
        field_name = f"{field}[{index}].id"
        if unit_id not in served:
            raise InvalidRequest(
                f"{field_name}: unknown {noun} '{unit_id}' (served: "
                f"{', '.join(served) or 'none'}; GET /v1/{field.replace('_', '-')})",
                field_name,
            )
        if served[unit_id].fits != source.unet_signature:
            raise InvalidRequest(
                f"{field_name}: '{unit_id}' does not fit model '{source.id}' (it was made "
                f"for another UNet architecture)",
                field_name,
            )


def check_upscaler(
    models: ModelManager, field: str, upscaler: str, size: tuple[int, int], target: tuple[int, int]
) -> None:
    """`upscaler` is 'lanczos' or a served upscale model whose passes reach `target` from `size`."""
    from backends.sdxl_backend.models.upscalers import MAX_PASSES, passes_for

    if upscaler == "lanczos":
        return
    if upscaler not in models.upscalers:
        raise InvalidRequest(
            f"{field}: unknown upscaler '{upscaler}' (served: "
            f"{', '.join(['lanczos', *models.upscalers])}; GET /v1/upscalers)",
            field,
        )
    scale = models.upscalers[upscaler].scale
    if passes_for(scale, size, target) > MAX_PASSES:
        raise InvalidRequest(
            f"{field}: '{upscaler}' ({scale}x) would need more than {MAX_PASSES} passes to reach "
            f"{target[0]}x{target[1]} from {size[0]}x{size[1]}",
            field,
        )


def outpaint(
    request: GenerationRequest, image: Image.Image | None
) -> tuple[GenerationRequest, Image.Image, Image.Image]:
    """An outpainting request as an inpainting one: the input grown by its margins (the new area
    filled as asked), the mask of the new area, and strength 1.0 unless the request gave one."""
    spec = request.outpaint
    assert spec is not None  # (asked for)
    if image is None:
        raise InvalidRequest("outpaint: needs the image to grow (`image`)", "outpaint")
    if request.mask is not None:
        raise InvalidRequest("outpaint: not with a mask (outpainting makes its own, of the new area)", "outpaint")
    margins = (spec.left, spec.top, spec.right, spec.bottom)
    if not any(margins):
        raise InvalidRequest("outpaint: give at least one margin (left, right, top, bottom)", "outpaint")
    if request.width is not None or request.height is not None:
        raise InvalidRequest(
            "outpaint: the size is the input's plus the margins; leave width and height out", "outpaint"
        )
    grown, new_area = outpainted(image, margins, spec.fill)
    strength = {} if "strength" in request.model_fields_set else {"strength": 1.0}
    return request.model_copy(update=strength), grown, new_area
