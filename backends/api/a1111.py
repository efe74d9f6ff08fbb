"""The AUTOMATIC1111 dialect: `/sdapi/v1/txt2img`, `/img2img`, `/sd-models`, `/samplers`,
`/progress`, `/interrupt`, `/options`, for the many tools that speak only this API.

A1111 clients send every field of A1111's request model, most at their defaults. Fields this
server honours are mapped; any other field is accepted only at A1111's default (or empty), and
refused with a 400 naming it otherwise, so an option the client turned on (hires fix, face
restoration, an inpainting mask...) is never silently dropped.
"""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from backends.api import errors
from backends.api.runtime import Runtime, runtime_of
from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.jobs import Job, JobStatus
from backends.sdxl_backend.protocol import MAX_SEED, TINY_PNG, GenerationRequest, GenerationResult, ImageBytes
from backends.sdxl_backend.schedulers import SCHEDULERS

# A1111's sampler names (and its older "k_" aliases) for our schedulers. Newer A1111 versions
# send the noise schedule apart ("scheduler": "Karras"), older ones inside the name.
SAMPLER_NAMES = {spec.label.lower(): name for name, spec in SCHEDULERS.items()}
SAMPLER_NAMES |= {"k_euler": "euler", "k_euler_a": "euler_a", "k_heun": "heun", "k_lms": "lms",
                  "k_dpmpp_2m": "dpmpp_2m", "k_dpmpp_2m_ka": "dpmpp_2m_karras"}
KARRAS = {"euler": "euler_karras", "dpmpp_2m": "dpmpp_2m_karras"}

# A1111 fields this server does not implement, at the values A1111 sends when they are off.
OFF = {
    "subseed": -1, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "s_noise": 1.0,
    "override_settings_restore_afterwards": True, "send_images": True, "resize_mode": 0, "mask_blur": 4,
    "inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0,
    "initial_noise_multiplier": 1.0, "hr_scale": 2.0, "image_cfg_scale": 1.5, "sampler_index": "Euler",
    "hr_upscaler": "Latent", "disable_extra_networks": False, "hr_resize_x": 0, "hr_resize_y": 0,
}


class A1111Request(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"example":
        {"prompt": "a red fox", "sampler_name": "Euler a", "steps": 20, "width": 512, "height": 512, "seed": 1}})

    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    seed: int = Field(-1, ge=-1, le=MAX_SEED)  # -1: random
    sampler_name: str | None = None
    scheduler: str | None = None  # "Automatic", "Karras", ...
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int | None = Field(None, ge=1)
    cfg_scale: float | None = Field(None, ge=0)
    width: int | None = None
    height: int | None = None
    override_settings: dict[str, Any] = {}
    # img2img
    init_images: list[ImageBytes] = []
    denoising_strength: float | None = Field(None, ge=0, le=1)  # txt2img: hires fix only, ignored

    def to_generation_request(self, img2img: bool) -> GenerationRequest:
        self._refuse_what_is_on()
        if self.n_iter != 1:
            raise InvalidRequest("n_iter: one batch per request here; use batch_size", "n_iter")
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
        return GenerationRequest(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            model=model.split(" ")[0] if model else None,  # A1111 titles: "name [hash]"
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance_scale=self.cfg_scale,
            seed=None if self.seed == -1 else self.seed,
            n=self.batch_size,
            scheduler=self._scheduler(),
            image=self.init_images[0] if img2img else None,
            strength=self.denoising_strength if img2img and self.denoising_strength else 0.75,
        )

    def _scheduler(self) -> str | None:
        if not self.sampler_name:
            return None
        name = self.sampler_name.strip().lower()
        karras = name.endswith(" karras") or (self.scheduler or "").lower() == "karras"
        base = SAMPLER_NAMES.get(name) or SAMPLER_NAMES.get(name.removesuffix(" karras"))
        if base is None:
            raise InvalidRequest(
                f"sampler_name: unknown sampler '{self.sampler_name}'; "
                f"known: {', '.join(spec.label for spec in SCHEDULERS.values())}", "sampler_name")
        return KARRAS.get(base, base) if karras else base

    def _refuse_what_is_on(self) -> None:
        for field, value in (self.model_extra or {}).items():
            if value in (None, False, 0, "", [], {}) or OFF.get(field) == value:
                continue
            raise InvalidRequest(f"{field}: not supported by this server (sent {value!r})", field)
        unknown = set(self.override_settings) - {"sd_model_checkpoint"}
        if unknown:
            raise InvalidRequest(f"override_settings: only sd_model_checkpoint is supported, not "
                                 f"{', '.join(sorted(unknown))}", "override_settings")


def render(body: A1111Request, result: GenerationResult) -> dict[str, Any]:
    request = result.request
    info = {
        "prompt": request.prompt, "negative_prompt": request.negative_prompt,
        "seed": result.seeds[0], "all_seeds": result.seeds,
        "width": request.width, "height": request.height, "steps": request.steps,
        "cfg_scale": request.guidance_scale, "sampler_name": SCHEDULERS[request.scheduler].label,
        "sd_model_name": result.model, "batch_size": request.n,
        "denoising_strength": request.strength if result.img2img else None,
    }
    return {
        "images": [base64.b64encode(image.data).decode() for image in result.images],
        "parameters": body.model_dump(exclude={"init_images"}),
        "info": json.dumps(info),
    }


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
            "skipped": False, "interrupted": job is not None and job.status == JobStatus.CANCELLED,
            "job": "running" if running else "", "job_count": 1 if running else 0, "job_timestamp": "0",
            "job_no": 0, "sampling_step": job.step if running else 0,
            "sampling_steps": job.total_steps if running else 0,
        },
        "current_image": base64.b64encode(job.preview).decode() if running and preview and job.preview else None,
        "textinfo": None,
    }


class A1111Answer(BaseModel):
    images: list[str] = Field(description="base64 PNGs (or the requested format)")
    parameters: dict[str, Any]
    info: str = Field(description="JSON text: seed, all_seeds, sampler_name, ...")


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


@router.get("/samplers", responses=errors.responses(401))
async def list_samplers() -> list[dict[str, Any]]:
    return samplers()


@router.get("/options", responses=errors.responses(401))
async def options(runtime: RuntimeDep) -> dict[str, Any]:
    return {"sd_model_checkpoint": runtime.default_model}


def own_running_job(runtime: Runtime, request: Request) -> Job | None:
    """The job on the device, if the caller may see it (with API keys: if its key made it)."""
    job, owner = runtime.jobs.running, runtime.owner(request)
    return job if job is not None and (owner is None or job.owner == owner) else None


@router.get("/progress", responses=errors.responses(401))
async def get_progress(request: Request, runtime: RuntimeDep, skip_current_image: bool = False) -> dict[str, Any]:
    return progress(own_running_job(runtime, request), preview=not skip_current_image)


@router.post("/interrupt", responses=errors.responses(401))
async def interrupt(request: Request, runtime: RuntimeDep) -> dict[str, Any]:
    """Stops the running generation at its next step, as A1111's interrupt does (with API
    keys, only a generation of the caller's key)."""
    job = own_running_job(runtime, request)
    if job is not None:
        runtime.jobs.cancel(job, "interrupted (/sdapi/v1/interrupt)")
    return {}
