"""The AUTOMATIC1111 dialect's wire models: what its clients send (every field of A1111's own
models, most at their defaults) and what they read back, and two ways of reading them (a field
left on that this server does not do; a model's title). mapping.py says what each field means
here."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.image_bytes import TINY_PNG, ImageBytes
from backends.sdxl_backend.protocol import MAX_SEED, Priority

# The alwayson_scripts this server runs, by their titles (lower case): sd-webui-controlnet's,
# the CFG Rescale extension's (its first arg the rescale), and Forge's built-in PAG script
# ([enabled, scale, attenuation, start step, end step]; mapping.py).
CFG_RESCALE_SCRIPT = "cfg rescale extension"
PAG_SCRIPT = "perturbedattentionguidance integrated"
SCRIPTS = ("controlnet", CFG_RESCALE_SCRIPT, PAG_SCRIPT)


class A1111ControlNetUnit(BaseModel):
    """One unit of the sd-webui-controlnet extension's API (what `webuiapi.ControlNetUnit`
    sends). Preprocessing runs at the output size here, which is the extension's pixel-perfect
    mode, so `processor_res`, `pixel_perfect` and `low_vram` change nothing."""

    model_config = ConfigDict(extra="allow")

    enabled: bool = True
    image: ImageBytes | None = None  # img2img without one: the input image, as the extension does
    input_image: ImageBytes | None = None  # its older name
    mask: ImageBytes | None = None
    module: str = "none"
    model: str = "None"
    weight: float = Field(1.0, ge=0, le=2)
    guidance_start: float = Field(0.0, ge=0, le=1)
    guidance_end: float = Field(1.0, ge=0, le=1)
    control_mode: int | str = "Balanced"
    resize_mode: int | str = "Crop and Resize"
    threshold_a: float = Field(-1, ge=-1, le=255)  # canny: the low threshold (-1: the extension's default)
    threshold_b: float = Field(-1, ge=-1, le=255)  # canny: the high one
    processor_res: int = 512
    pixel_perfect: bool = False
    low_vram: bool = False
    hr_option: str = "Both"  # with a hires fix, the units guide both passes here


class A1111Request(BaseModel):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "example": {
                "prompt": "a red fox",
                "sampler_name": "Euler a",
                "steps": 20,
                "width": 512,
                "height": 512,
                "seed": 1,
            }
        },
    )

    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    seed: int = Field(-1, ge=-1, le=MAX_SEED)  # -1: random
    sampler_name: str | None = None
    sampler_index: str | None = None  # A1111's older name for sampler_name; used when that is empty
    scheduler: str | None = None  # "Automatic", "Karras", ...
    eta: float | None = Field(None, ge=0, le=1)
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int | None = Field(None, ge=1)
    cfg_scale: float | None = Field(None, ge=0)
    width: int | None = None
    height: int | None = None
    override_settings: dict[str, Any] = {}  # A1111's options for this request alone (options.py)
    clip_skip: int | float | None = None  # SD.Next's top-level clip skip (SillyTavern sends it too)
    priority: Priority = "normal"  # this server's: its place in the queue, as the native API's
    # img2img
    init_images: list[ImageBytes] = []
    denoising_strength: float | None = Field(None, ge=0, le=1)  # txt2img: the hires fix's second pass
    # txt2img hires fix
    enable_hr: bool = False
    hr_scale: float = Field(2.0, ge=1, le=4)
    hr_upscaler: str | None = "Latent"
    hr_second_pass_steps: int = Field(0, ge=0)  # 0: the same as steps
    hr_resize_x: int = Field(0, ge=0)
    hr_resize_y: int = Field(0, ge=0)
    # img2img inpainting (without a mask A1111 ignores these, and so does this server)
    mask: ImageBytes | None = None
    mask_blur: int = Field(4, ge=0, le=64)
    inpainting_fill: int = Field(0, ge=0, le=3)  # 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpaint_full_res: bool = True  # "only masked"
    inpaint_full_res_padding: int = Field(0, ge=0, le=1024)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    disable_extra_networks: bool = False  # True: LoRA tags are taken out of the prompt and not applied
    refiner_checkpoint: str | None = None  # a refiner's title ("name [hash]" or "name")
    refiner_switch_at: float | None = Field(None, gt=0, lt=1)
    alwayson_scripts: dict[str, Any] = {}  # {"controlnet": {"args": [unit, ...]}} (any case); no other script


class A1111Img2ImgRequest(A1111Request):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {"prompt": "an oil painting", "init_images": [TINY_PNG], "denoising_strength": 0.6, "steps": 10}
        }
    )


class A1111Answer(BaseModel):
    images: list[str] = Field(description="base64 PNGs (or the requested format)")
    parameters: dict[str, Any]
    info: str = Field(description="JSON text: seed, all_seeds, sampler_name, ...")


class A1111Options(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"example": {"jpeg_quality": 80}})

    sd_model_checkpoint: str | None = Field(
        None, description="A served model id or alias: the default model of the caller's API key."
    )


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"image": TINY_PNG}})

    image: ImageBytes


def refuse_what_is_on(extra: dict[str, Any] | None, prefix: str = "", off: dict[str, Any] | None = None) -> None:
    """Fields this server does not implement pass when off (empty, 0, False, or the value in
    `off`, A1111's default); one turned on is a 400 naming it."""
    for name, value in (extra or {}).items():
        if value in (None, False, 0, "", [], {}) or (off or {}).get(name) == value:
            continue
        raise InvalidRequest(f"{prefix}{name}: not supported by this server (sent {value!r})", f"{prefix}{name}")


def title_name(title: str) -> str:
    """The name in an A1111 model title, "name [hash]" (or the bare name)."""
    return title.split(" ")[0]
