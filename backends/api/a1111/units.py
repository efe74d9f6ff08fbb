"""The sd-webui-controlnet extension's units, as A1111 clients send them in
`alwayson_scripts.controlnet.args`: ControlNet units become native `controlnets`, IP-Adapter
units (the extension runs image prompts as units too) native `ip_adapters`. Anything a unit
turns on that this server does not do is a 400 naming the unit's field."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from backends.api.a1111.protocol import SCRIPTS, A1111ControlNetUnit, A1111Request, refuse_what_is_on, title_name
from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.models.controlnets import PREPROCESSORS
from backends.sdxl_backend.units import MAX_CONTROLNETS, MAX_IP_ADAPTERS

# The sd-webui-controlnet extension's names (and numbers) for what this server does.
CONTROL_MODES = {"balanced": False, "0": False, "controlnet is more important": True, "2": True}  # -> guess_mode
RESIZE_MODES = {
    "just resize": "stretch",
    "0": "stretch",
    "crop and resize": "crop",
    "1": "crop",
    "resize and fill": "fill",
    "2": "fill",
    "inner fit (scale to fit)": "crop",
    "outer fit (shrink to fit)": "fill",
}  # (its older names)
CANNY_DEFAULTS = (100, 200)  # the extension's thresholds when a unit leaves them at -1


def is_image_prompt(unit: A1111ControlNetUnit) -> bool:
    """An IP-Adapter unit: the extension's `ip-adapter_clip_*` and `ip-adapter-auto` modules, or
    Forge's `CLIP-ViT-H (IPAdapter)` and its kin (the face ones included, to be refused by name)."""
    module = unit.module.strip().lower()
    return module.startswith(("ip-adapter", "ip_adapter")) or module.endswith("(ipadapter)")


def image_prompt_to_native(unit: A1111ControlNetUnit, field: str, init_image: bytes | None) -> dict[str, Any]:
    """An IP-Adapter unit as a native `ip_adapters` entry. The module names the image encoder in
    A1111; here each IP-Adapter brings its own, so any CLIP module reads the same."""
    refuse_what_is_on(unit.model_extra, f"{field}.")
    module = unit.module.strip().lower()
    if any(face in module for face in ("face", "pulid")):
        raise InvalidRequest(
            f"{field}.module: '{unit.module}' (InsightFace) is not available here; use ip-adapter-auto",
            f"{field}.module",
        )
    model = _model(unit, field, "an IP-Adapter")
    if (unit.guidance_start, unit.guidance_end) != (0.0, 1.0):
        raise InvalidRequest(
            f"{field}.guidance_start: an IP-Adapter acts on every step here (start 0, end 1)", f"{field}.guidance_start"
        )
    return {"id": model, "image": _image(unit, field, init_image), "scale": unit.weight}


def _model(unit: A1111ControlNetUnit, field: str, kind: str) -> str:
    model = title_name(unit.model.strip())
    if model.lower() in ("", "none"):
        raise InvalidRequest(f"{field}.model: name {kind} (GET /controlnet/model_list)", f"{field}.model")
    return model


def _image(unit: A1111ControlNetUnit, field: str, init_image: bytes | None) -> bytes:
    """The unit's image; in img2img without one, the input image (as the extension does)."""
    image = unit.image or unit.input_image or init_image
    if not image:
        raise InvalidRequest(f"{field}.image: required (txt2img has no input image to fall back on)", f"{field}.image")
    return image


def unit_to_native(unit: A1111ControlNetUnit, field: str, init_image: bytes | None) -> dict[str, Any]:
    refuse_what_is_on(unit.model_extra, f"{field}.")
    module = unit.module.strip().lower()
    if module not in PREPROCESSORS:
        raise InvalidRequest(
            f"{field}.module: '{unit.module}' is not available here; use {' or '.join(PREPROCESSORS)}",
            f"{field}.module",
        )
    model = _model(unit, field, "a ControlNet")
    guess_mode = CONTROL_MODES.get(str(unit.control_mode).strip().lower())
    if guess_mode is None:
        raise InvalidRequest(
            f"{field}.control_mode: '{unit.control_mode}' is not available here; use Balanced or "
            "ControlNet is more important",
            f"{field}.control_mode",
        )
    resize_mode = RESIZE_MODES.get(str(unit.resize_mode).strip().lower())
    if resize_mode is None:
        raise InvalidRequest(
            f"{field}.resize_mode: '{unit.resize_mode}' is not one of Just Resize, Crop and Resize, Resize and Fill",
            f"{field}.resize_mode",
        )
    if unit.hr_option.strip().lower() != "both":
        raise InvalidRequest(
            f"{field}.hr_option: '{unit.hr_option}' is not available here; with a hires fix the "
            "units guide both passes (Both)",
            f"{field}.hr_option",
        )
    if unit.mask:
        raise InvalidRequest(
            f"{field}.mask: a unit's own mask is not supported; inpaint with the request's mask", f"{field}.mask"
        )
    image = _image(unit, field, init_image)
    low, high = (
        round(value) if value >= 0 else default
        for value, default in zip((unit.threshold_a, unit.threshold_b), CANNY_DEFAULTS)
    )
    return {
        "id": model,
        "image": image,
        "scale": unit.weight,
        "start": unit.guidance_start,
        "end": unit.guidance_end,
        "preprocess": module,
        "low_threshold": low,
        "high_threshold": high,
        "resize_mode": resize_mode,
        "guess_mode": guess_mode,
    }


def control_units(body: A1111Request, img2img: bool) -> dict[str, list[dict[str, Any]]]:
    """The enabled units of `alwayson_scripts`' ControlNet, as native `controlnets` and
    `ip_adapters` (the extension runs IP-Adapters as units too)."""
    scripts = {name.strip().lower(): script for name, script in body.alwayson_scripts.items()}
    for name, script in scripts.items():
        if name not in SCRIPTS and script not in (None, {}, {"args": []}):
            raise InvalidRequest(
                f"alwayson_scripts.{name}: not supported by this server (only ControlNet, CFG rescale and PAG)",
                f"alwayson_scripts.{name}",
            )
    script = scripts.get("controlnet") or {}
    args = script.get("args", []) if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise InvalidRequest(
            'alwayson_scripts.controlnet: must be {"args": [unit, ...]}', "alwayson_scripts.controlnet"
        )
    units: dict[str, list[dict[str, Any]]] = {"controlnets": [], "ip_adapters": []}
    for index, raw in enumerate(args):
        field = f"alwayson_scripts.controlnet.args[{index}]"
        try:
            unit = A1111ControlNetUnit.model_validate(raw)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join([field, *(str(part) for part in error["loc"])])
            raise InvalidRequest(f"{where}: {error['msg']}", where) from None
        if unit.enabled:
            init_image = body.init_images[0] if img2img and body.init_images else None
            if is_image_prompt(unit):
                units["ip_adapters"].append(image_prompt_to_native(unit, field, init_image))
            else:
                units["controlnets"].append(unit_to_native(unit, field, init_image))
    for kind, most in (("controlnets", MAX_CONTROLNETS), ("ip_adapters", MAX_IP_ADAPTERS)):
        if len(units[kind]) > most:
            raise InvalidRequest(
                f"alwayson_scripts.controlnet.args: {len(units[kind])} enabled {kind} units; at most {most}",
                "alwayson_scripts.controlnet.args",
            )
    return units
