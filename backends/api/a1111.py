"""The AUTOMATIC1111 dialect (`/sdapi/v1/...`), for the many tools that speak only this API,
`webuiapi` first among them.

A1111 clients send every field of A1111's request model, most at their defaults. Fields this
server honours are mapped; `eta` is honoured where A1111 honours it (DDIM, and the ancestral
samplers at their one value here, 1.0) and ignored where A1111 ignores it; any other field is
accepted only at A1111's default (or empty), and refused with a 400 naming it otherwise, so an
option the client turned on (hires fix, face restoration, scripts...) is never
silently dropped. LoRAs come as A1111 prompts carry them, `<lora:name:weight>`, and are
taken out of the text the encoders see. ControlNet units come as the sd-webui-controlnet
extension takes them, in `alwayson_scripts.controlnet.args`, and its `/controlnet/...` listings
are served. `/interrupt` and `/skip` end the caller's running generation at its next step
and its request answers with the image as it stood, as A1111's do. The listings of things this
server does not have (upscalers, VAEs...) are truthfully empty; `/loras` lists the served
LoRAs, `/embeddings` the served textual-inversion embeddings, `/scripts` ControlNet when one is
served.
"""

from __future__ import annotations

import base64
import io
import json
import re
from typing import Annotated, Any

import psutil
from PIL import Image

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backends.api import errors
from backends.api.runtime import Runtime, runtime_of
from backends.sdxl_backend.controlnets import PREPROCESSORS
from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.jobs import Job, JobStatus
from backends.sdxl_backend.protocol import (
    MAX_CONTROLNETS,
    MAX_LORAS,
    MAX_SEED,
    TINY_PNG,
    GenerationRequest,
    GenerationResult,
    ImageBytes,
    LoraWeight,
)
from backends.sdxl_backend.schedulers import SCHEDULERS

# A1111's sampler names (and its older "k_" aliases) for our schedulers. Newer A1111 versions
# send the noise schedule apart ("scheduler": "Karras"), older ones inside the name.
SAMPLER_NAMES = {spec.label.lower(): name for name, spec in SCHEDULERS.items()}
SAMPLER_NAMES |= {"k_euler": "euler", "k_euler_a": "euler_a", "k_heun": "heun", "k_lms": "lms",
                  "k_dpmpp_2m": "dpmpp_2m", "k_dpmpp_2m_ka": "dpmpp_2m_karras"}
KARRAS = {"euler": "euler_karras", "dpmpp_2m": "dpmpp_2m_karras"}
ANCESTRAL = {"euler_a"}

# A1111 fields this server does not implement, at the values A1111 sends when they are off.
OFF = {
    "subseed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "s_noise": 1.0,
    "override_settings_restore_afterwards": True, "send_images": True, "resize_mode": 0,
    "initial_noise_multiplier": 1.0, "image_cfg_scale": 1.5,
}
# A1111's extra-network tag for LoRAs: <lora:name> or <lora:name:weight> (its older <lyco:...> too).
LORA_TAG = re.compile(r"<\s*(?:lora|lyco)\s*:\s*([^:<>]+?)\s*(?::\s*([^:<>]*?)\s*)?(?::[^<>]*)?>", re.IGNORECASE)


def take_loras(prompt: str) -> tuple[str, list[LoraWeight]]:
    """The prompt without its LoRA tags, and the LoRAs they name (a weight that is not a
    number is a 400 naming the tag)."""
    loras = []
    for match in LORA_TAG.finditer(prompt):
        name, weight = match[1], match[2]
        try:
            loras.append(LoraWeight(id=name, weight=float(weight) if weight else 1.0))
        except ValueError:
            raise InvalidRequest(f"prompt: {match[0]} does not give a weight between -4 and 4", "prompt") from None
    if len(loras) > MAX_LORAS:
        raise InvalidRequest(f"prompt: {len(loras)} LoRA tags; at most {MAX_LORAS}", "prompt")
    text = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", LORA_TAG.sub(" ", prompt))).strip(" ,")
    return text, loras

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


# The sd-webui-controlnet extension's names (and numbers) for what this server does.
CONTROL_MODES = {"balanced": False, "0": False, "controlnet is more important": True, "2": True}  # -> guess_mode
RESIZE_MODES = {"just resize": "stretch", "0": "stretch", "crop and resize": "crop", "1": "crop",
                "resize and fill": "fill", "2": "fill",
                "inner fit (scale to fit)": "crop", "outer fit (shrink to fit)": "fill"}  # (its older names)
CANNY_DEFAULTS = (100, 200)  # the extension's thresholds when a unit leaves them at -1


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

    def to_native(self, field: str, init_image: bytes | None) -> dict[str, Any]:
        refuse_what_is_on(self.model_extra, f"{field}.")
        module = self.module.strip().lower()
        if module not in PREPROCESSORS:
            raise InvalidRequest(f"{field}.module: '{self.module}' is not available here; use "
                                 f"{' or '.join(PREPROCESSORS)}", f"{field}.module")
        model = title_name(self.model.strip())
        if model.lower() in ("", "none"):
            raise InvalidRequest(f"{field}.model: name a ControlNet (GET /controlnet/model_list)", f"{field}.model")
        guess_mode = CONTROL_MODES.get(str(self.control_mode).strip().lower())
        if guess_mode is None:
            raise InvalidRequest(f"{field}.control_mode: '{self.control_mode}' is not available here; use Balanced or "
                                 "ControlNet is more important", f"{field}.control_mode")
        resize_mode = RESIZE_MODES.get(str(self.resize_mode).strip().lower())
        if resize_mode is None:
            raise InvalidRequest(f"{field}.resize_mode: '{self.resize_mode}' is not one of Just Resize, Crop and "
                                 "Resize, Resize and Fill", f"{field}.resize_mode")
        if self.hr_option.strip().lower() != "both":
            raise InvalidRequest(f"{field}.hr_option: '{self.hr_option}' is not available here; with a hires fix the "
                                 "units guide both passes (Both)", f"{field}.hr_option")
        if self.mask:
            raise InvalidRequest(f"{field}.mask: a unit's own mask is not supported; inpaint with the request's mask",
                                 f"{field}.mask")
        image = self.image or self.input_image or init_image
        if not image:
            raise InvalidRequest(f"{field}.image: required (txt2img has no input image to fall back on)",
                                 f"{field}.image")
        low, high = (round(value) if value >= 0 else default
                     for value, default in zip((self.threshold_a, self.threshold_b), CANNY_DEFAULTS))
        return {"id": model, "image": image, "scale": self.weight, "start": self.guidance_start,
                "end": self.guidance_end, "preprocess": module, "low_threshold": low, "high_threshold": high,
                "resize_mode": resize_mode, "guess_mode": guess_mode}


# A1111's upscalers for the hires fix that this server has, and what they are here.
HIRES_UPSCALERS = {"latent": "latent", "lanczos": "lanczos"}


class A1111Request(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"example":
        {"prompt": "a red fox", "sampler_name": "Euler a", "steps": 20, "width": 512, "height": 512, "seed": 1}})

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
    override_settings: dict[str, Any] = {}
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

    def to_generation_request(self, img2img: bool) -> GenerationRequest:
        self._refuse_what_is_on()
        if img2img and len(self.init_images) != 1:
            raise InvalidRequest("init_images: img2img takes exactly one image", "init_images")
        if not img2img and self.init_images:
            raise InvalidRequest("init_images: txt2img takes no image; use /sdapi/v1/img2img", "init_images")
        if img2img and self.denoising_strength == 0:
            raise InvalidRequest("denoising_strength: 0 would return the input unchanged; use (0, 1]",
                                 "denoising_strength")
        model = self.override_settings.get("sd_model_checkpoint")
        if model is not None and not isinstance(model, str):
            raise InvalidRequest("override_settings.sd_model_checkpoint: must be a model name (a string)",
                                 "override_settings.sd_model_checkpoint")
        scheduler = self._scheduler()
        prompt, loras = take_loras(self.prompt)
        return GenerationRequest(
            prompt=prompt,
            negative_prompt=self.negative_prompt,
            model=title_name(model) if model else None,
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance_scale=self.cfg_scale,
            seed=None if self.seed == -1 else self.seed,
            n=self.batch_size * self.n_iter,  # A1111's seeds run on across batches too: seed + i
            scheduler=scheduler,
            eta=self._eta(scheduler),
            image=self.init_images[0] if img2img else None,
            strength=self.denoising_strength if img2img and self.denoising_strength else 0.75,
            **self._inpainting(img2img),
            hires_fix=self._hires_fix(img2img),
            loras=[] if self.disable_extra_networks else loras,
            refiner={"model": title_name(self.refiner_checkpoint), "switch_at": self.refiner_switch_at or 0.8}
            if self.refiner_checkpoint else None,
            controlnets=self._controlnets(img2img),
        )

    def _controlnets(self, img2img: bool) -> list[dict[str, Any]]:
        """The enabled ControlNet units of `alwayson_scripts`, as native `controlnets`."""
        scripts = {name.strip().lower(): script for name, script in self.alwayson_scripts.items()}
        for name, script in scripts.items():
            if name != "controlnet" and script not in (None, {}, {"args": []}):
                raise InvalidRequest(f"alwayson_scripts.{name}: not supported by this server (only ControlNet)",
                                     f"alwayson_scripts.{name}")
        script = scripts.get("controlnet") or {}
        args = script.get("args", []) if isinstance(script, dict) else None
        if not isinstance(args, list):
            raise InvalidRequest('alwayson_scripts.controlnet: must be {"args": [unit, ...]}',
                                 "alwayson_scripts.controlnet")
        units = []
        for index, raw in enumerate(args):
            field = f"alwayson_scripts.controlnet.args[{index}]"
            try:
                unit = A1111ControlNetUnit.model_validate(raw)
            except ValidationError as exc:
                error = exc.errors()[0]
                where = ".".join([field, *(str(part) for part in error["loc"])])
                raise InvalidRequest(f"{where}: {error['msg']}", where) from None
            if unit.enabled:
                units.append(unit.to_native(field, self.init_images[0] if img2img and self.init_images else None))
        if len(units) > MAX_CONTROLNETS:
            raise InvalidRequest(f"alwayson_scripts.controlnet.args: {len(units)} enabled units; at most "
                                 f"{MAX_CONTROLNETS}", "alwayson_scripts.controlnet.args")
        return units

    def _hires_fix(self, img2img: bool) -> dict[str, Any] | None:
        if not self.enable_hr or img2img:  # A1111's img2img has no hires fix and ignores the flag
            return None
        upscaler = HIRES_UPSCALERS.get((self.hr_upscaler or "latent").strip().lower())
        if upscaler is None:
            raise InvalidRequest(f"hr_upscaler: '{self.hr_upscaler}' is not available here; use Latent or Lanczos",
                                 "hr_upscaler")
        size = {"width": self.hr_resize_x, "height": self.hr_resize_y} if self.hr_resize_x and self.hr_resize_y else {}
        return {"scale": self.hr_scale, **size, "upscaler": upscaler,
                "strength": self.denoising_strength or 0.7, "steps": self.hr_second_pass_steps or None}

    def _inpainting(self, img2img: bool) -> dict[str, Any]:
        if self.mask is None:
            return {}
        if not img2img:
            raise InvalidRequest("mask: txt2img takes no mask; use /sdapi/v1/img2img", "mask")
        if self.inpainting_fill not in (0, 1):
            raise InvalidRequest(f"inpainting_fill: {self.inpainting_fill} (latent noise/nothing) is not available; "
                                 "use 0 (fill) or 1 (original)", "inpainting_fill")
        return {"mask": self.mask, "mask_blur": self.mask_blur, "mask_invert": bool(self.inpainting_mask_invert),
                "masked_content": "fill" if self.inpainting_fill == 0 else "original",
                "masked_area_only": self.inpaint_full_res, "masked_area_padding": self.inpaint_full_res_padding}

    def _scheduler(self) -> str | None:
        sampler, field = (self.sampler_name, "sampler_name") if self.sampler_name else (self.sampler_index, "sampler_index")
        schedule = (self.scheduler or "automatic").strip().lower()
        if schedule not in ("automatic", "karras"):
            raise InvalidRequest(f"scheduler: '{self.scheduler}' is not available here; use Automatic or Karras",
                                 "scheduler")
        if not sampler:
            return None
        name = sampler.strip().lower()
        karras = name.endswith(" karras") or schedule == "karras"
        base = SAMPLER_NAMES.get(name) or SAMPLER_NAMES.get(name.removesuffix(" karras"))
        if base is None:
            raise InvalidRequest(
                f"{field}: unknown sampler '{sampler}'; "
                f"known: {', '.join(spec.label for spec in SCHEDULERS.values())}", field)
        return KARRAS.get(base, base) if karras else base

    def _eta(self, scheduler: str | None) -> float | None:
        """DDIM takes eta; the ancestral samplers here add full noise (A1111's eta 1.0); the
        others have no eta, and A1111 ignores it for them too."""
        if self.eta is None or scheduler is None:
            return None
        if scheduler == "ddim":
            return self.eta
        if scheduler in ANCESTRAL and self.eta != 1.0:
            raise InvalidRequest(f"eta: the ancestral samplers here run at eta 1.0 only (sent {self.eta})", "eta")
        return None

    def _refuse_what_is_on(self) -> None:
        refuse_what_is_on(self.model_extra, off=OFF)
        unknown = set(self.override_settings) - {"sd_model_checkpoint"}
        if unknown:
            raise InvalidRequest(f"override_settings: only sd_model_checkpoint is supported, not "
                                 f"{', '.join(sorted(unknown))}", "override_settings")


class A1111Answer(BaseModel):
    images: list[str] = Field(description="base64 PNGs (or the requested format)")
    parameters: dict[str, Any]
    info: str = Field(description="JSON text: seed, all_seeds, sampler_name, ...")


def render(body: A1111Request, result: GenerationResult) -> dict[str, Any]:
    request = result.request
    info = {
        "prompt": request.prompt, "negative_prompt": request.negative_prompt,
        "seed": result.seeds[0], "all_seeds": result.seeds,
        "width": request.width, "height": request.height, "steps": request.steps,
        "cfg_scale": request.guidance_scale, "sampler_name": SCHEDULERS[request.scheduler].label,
        "sd_model_name": result.model, "batch_size": body.batch_size, "n_iter": body.n_iter,
        "denoising_strength": request.strength if result.img2img else None,
        # (A1111's own info has no such field: what the text encoders read, tokens and chunks of 75)
        "prompt_reading": {name: reading.model_dump() for name, reading in result.prompt_reading.items()},
    }
    return A1111Answer(
        images=[base64.b64encode(image.data).decode() for image in result.images],
        parameters=body.model_dump(exclude={"init_images", "mask", "alwayson_scripts"}),
        info=json.dumps(info),
    ).model_dump()


def samplers() -> list[dict[str, Any]]:
    return [{"name": spec.label, "aliases": [name], "options": {}} for name, spec in SCHEDULERS.items()]


def progress(job: Job | None, preview: bool) -> dict[str, Any]:
    """A1111's /progress for the running (or latest) job; `job` may be None."""
    running = job is not None and job.status == JobStatus.RUNNING
    fraction = job.percent / 100 if running else 0.0
    return {
        "progress": fraction,
        "eta_relative": (job.eta_s or 0.0) if running else 0.0,
        "state": {
            "skipped": False, "interrupted": job is not None and job.stop_requested_at is not None,
            "job": "running" if running else "", "job_count": 1 if running else 0, "job_timestamp": "0",
            "job_no": 0, "sampling_step": job.step if running else 0,
            "sampling_steps": job.total_steps if running else 0,
        },
        "current_image": base64.b64encode(job.preview).decode() if running and preview and job.preview else None,
        "textinfo": None,
    }


router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])
GENERATION_ERRORS = errors.responses(400, 401, 404, 413, 422, 429, 503, 504, 507)
RuntimeDep = Annotated[Runtime, Depends(runtime_of)]


@router.post("/txt2img", response_model=A1111Answer, responses=GENERATION_ERRORS)
async def txt2img(body: A1111Request, request: Request, runtime: RuntimeDep) -> dict:
    return render(body, await runtime.run(body.to_generation_request(img2img=False), request))


class A1111Img2ImgRequest(A1111Request):
    model_config = ConfigDict(json_schema_extra={"example": {"prompt": "an oil painting", "init_images": [TINY_PNG],
                                                             "denoising_strength": 0.6, "steps": 10}})


@router.post("/img2img", response_model=A1111Answer, responses=GENERATION_ERRORS)
async def img2img(body: A1111Img2ImgRequest, request: Request, runtime: RuntimeDep) -> dict:
    return render(body, await runtime.run(body.to_generation_request(img2img=True), request))


@router.get("/sd-models", responses=errors.responses(401))
async def models(runtime: RuntimeDep) -> list[dict[str, Any]]:
    return [{"title": model.id, "model_name": model.id, "hash": model.version[:10], "sha256": None,
             "filename": model.id, "config": None} for model in runtime.served.values()]


@router.get("/loras", responses=errors.responses(401))
async def loras(runtime: RuntimeDep) -> list[dict[str, Any]]:
    """A1111's LoRA listing: `name` is what goes in `<lora:name:weight>`."""
    return [{"name": lora.id, "alias": lora.id, "path": f"{lora.id}.safetensors", "metadata": {}}
            for lora in runtime.loras.values()]


@router.get("/scripts", responses=errors.responses(401))
async def scripts(runtime: RuntimeDep) -> dict[str, list[str]]:
    """The scripts a request may turn on: ControlNet (`alwayson_scripts`) when one is served."""
    served = ["controlnet"] if runtime.controlnets else []
    return {"txt2img": served, "img2img": served}


@router.get("/samplers", responses=errors.responses(401))
async def list_samplers() -> list[dict[str, Any]]:
    return samplers()


@router.get("/options", responses=errors.responses(401))
async def get_options(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    return {**stored_options(request), "sd_model_checkpoint": runtime.default_model}


MAX_KEPT_OPTIONS_BYTES = 64 * 1024  # options change nothing here: a client must not grow them without end


class A1111Options(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"example": {"jpeg_quality": 80}})

    sd_model_checkpoint: str | None = Field(None, description="A served model id or alias: the new default model.")


@router.post("/options", responses=errors.responses(400, 401, 404))
async def set_options(body: A1111Options, request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    """`sd_model_checkpoint` switches the server's default model (as A1111's does, for every
    client); other options are kept and shown by GET, and change nothing else."""
    kept = {**stored_options(request), **(body.model_extra or {})}
    if len(json.dumps(kept)) > MAX_KEPT_OPTIONS_BYTES:
        raise InvalidRequest(f"options: the options kept here are limited to {MAX_KEPT_OPTIONS_BYTES} bytes of JSON",
                             "options")
    if body.sd_model_checkpoint is not None:
        runtime.engine.set_default_model(title_name(body.sd_model_checkpoint))
    stored_options(request).update(body.model_extra or {})
    return {}


def stored_options(request: Request) -> dict[str, Any]:
    state = request.app.state
    if not hasattr(state, "a1111_options"):
        state.a1111_options = {}
    return state.a1111_options


class PngInfoRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"image": TINY_PNG}})

    image: ImageBytes


@router.post("/png-info", responses=errors.responses(400, 401))
async def png_info(body: PngInfoRequest) -> dict[str, Any]:
    """The generation parameters an image carries (its `parameters` text, as this server and
    A1111 write it), parsed; other text chunks as `items`."""
    try:
        chunks = {k: v for k, v in Image.open(io.BytesIO(body.image)).info.items() if isinstance(v, str)}
    except Exception:
        raise InvalidRequest("image: not an image", "image") from None
    text = chunks.pop("parameters", "")
    return {"info": text, "items": chunks, "parameters": parse_infotext(text)}


def parse_infotext(text: str) -> dict[str, Any]:
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


async def own_running_jobs(runtime: Runtime, request: Request) -> list[Job]:
    """The running jobs that the caller may see (with API keys: those its key made)."""
    owner = runtime.owner(request)
    return [job for job in await runtime.on_queue(lambda: runtime.jobs.running) if owner is None or job.owner == owner]


@router.get("/progress", responses=errors.responses(401))
async def get_progress(request: Request, runtime: RuntimeDep, skip_current_image: bool = False) -> dict[str, Any]:
    return progress(next(iter(await own_running_jobs(runtime, request)), None), preview=not skip_current_image)


@router.post("/interrupt", responses=errors.responses(401))
@router.post("/skip", responses=errors.responses(401))
async def interrupt(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    """Ends the running generation at its next step; its request answers with the image as
    it stood, as A1111's does (with API keys, only a generation of the caller's key). Each
    request here is one batch, so skipping the current batch is the same. (A generation that
    shares its pipeline call with another client's runs on to its end.)"""
    for job in await own_running_jobs(runtime, request):
        await runtime.on_queue(runtime.jobs.stop_early, job, "interrupted (A1111 interrupt or skip)")
    return {}


@router.get("/schedulers", responses=errors.responses(401))
async def schedulers() -> list[dict[str, Any]]:
    """The noise schedules a sampler can be combined with."""
    return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
            {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}]


@router.get("/memory", responses=errors.responses(401))
async def memory(runtime: RuntimeDep) -> dict[str, Any]:
    ram = psutil.virtual_memory()
    used_total = runtime.engine.models.device_memory()
    cuda = ({"system": {"free": used_total[1] - used_total[0], "used": used_total[0], "total": used_total[1]}}
            if used_total else {"error": "no CUDA device"})
    return {"ram": {"free": ram.available, "used": ram.total - ram.available, "total": ram.total}, "cuda": cuda}


@router.post("/refresh-checkpoints", responses=errors.responses(401))
@router.post("/refresh-vae", responses=errors.responses(401))
@router.post("/refresh-loras", responses=errors.responses(401))
@router.post("/refresh-embeddings", responses=errors.responses(401))
async def refresh_checkpoints() -> None:
    """The served models are fixed at start (the bento's, or SDXL_MODELS), and there are no
    VAEs, LoRAs or embeddings of their own: nothing to rescan."""


@router.post("/unload-checkpoint", responses=errors.responses(401))
async def unload_checkpoint(runtime: RuntimeDep) -> dict[str, Any]:
    """Frees every loaded model, as /v1/system/unload does; the next request loads its model."""
    await runtime.unload()
    return {}


@router.get("/upscalers", responses=errors.responses(401))
async def upscalers() -> list[dict[str, Any]]:
    """The hires fix's image upscaler (the latent one is under /latent-upscale-modes)."""
    return [{"name": "Lanczos", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]


@router.get("/latent-upscale-modes", responses=errors.responses(401))
async def latent_upscale_modes() -> list[dict[str, Any]]:
    return [{"name": "Latent"}]


@router.get("/embeddings", responses=errors.responses(401))
async def embeddings(runtime: RuntimeDep) -> dict[str, Any]:
    """The served embeddings, as A1111 lists its loaded ones: a prompt names one by its id
    (`shape`: the width of its OpenCLIP-G vectors)."""
    sources = runtime.engine.embeddings.embeddings
    return {"loaded": {embedding_id: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                      "shape": int(source.fits.split("+")[1]), "vectors": source.vectors}
                       for embedding_id, source in sources.items()}, "skipped": {}}


# What this server does not have, listed as A1111 lists an empty collection.
EMPTY_LISTINGS: dict[str, Any] = {
    "/sd-vae": [], "/hypernetworks": [],
    "/face-restorers": [], "/realesrgan-models": [], "/prompt-styles": [], "/script-info": [],
    "/cmd-flags": {},
    "/extensions": [],
}


def empty_listing(path: str):
    async def listing() -> Any:
        return EMPTY_LISTINGS[path]
    return listing


for _path in EMPTY_LISTINGS:
    router.add_api_route(_path, empty_listing(_path), methods=["GET"], responses=errors.responses(401),
                         name=_path.strip("/").replace("-", "_"))


# The sd-webui-controlnet extension's own routes, which its clients read before sending units.
controlnet_router = APIRouter(prefix="/controlnet", tags=["AUTOMATIC1111"])


@controlnet_router.get("/version", responses=errors.responses(401))
async def controlnet_version() -> dict[str, int]:
    return {"version": 2}


@controlnet_router.get("/model_list", responses=errors.responses(401))
async def controlnet_models(runtime: RuntimeDep) -> dict[str, list[str]]:
    """The served ControlNets: what a unit's `model` names."""
    return {"model_list": list(runtime.controlnets)}


@controlnet_router.get("/module_list", responses=errors.responses(401))
async def controlnet_modules() -> dict[str, list[str]]:
    """The preprocessors: a unit's `module`."""
    return {"module_list": list(PREPROCESSORS)}
