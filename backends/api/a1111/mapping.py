"""The AUTOMATIC1111 dialect's meaning: an A1111 request as a `GenerationRequest` (refused with
a 400 naming the field when it asks for what this server does not do), and a result or a running
job shaped as A1111 answers them. No server in here: tests/test_a1111_mapping.py calls it as is."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from backends.api.a1111.extras import upscaler_id
from backends.api.a1111.protocol import A1111Answer, A1111Request, refuse_what_is_on, title_name
from backends.api.a1111.units import control_units
from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.jobs import Job, JobStatus
from backends.sdxl_backend.protocol import MAX_LORAS, GenerationRequest, GenerationResult, LoraWeight
from backends.sdxl_backend.schedulers import SCHEDULERS

# A1111's sampler names (and its older "k_" aliases) for our schedulers. Newer A1111 versions
# send the noise schedule apart ("scheduler": "Karras"), older ones inside the name.
SAMPLER_NAMES = {spec.label.lower(): name for name, spec in SCHEDULERS.items()}
SAMPLER_NAMES |= {
    "k_euler": "euler",
    "k_euler_a": "euler_a",
    "k_heun": "heun",
    "k_lms": "lms",
    "k_dpmpp_2m": "dpmpp_2m",
    "k_dpmpp_2m_ka": "dpmpp_2m_karras",
}
KARRAS = {"euler": "euler_karras", "dpmpp_2m": "dpmpp_2m_karras"}
ANCESTRAL = {"euler_a"}

# A1111 fields this server does not implement, at the values A1111 sends when they are off.
OFF = {
    "subseed": -1,
    "seed_resize_from_h": -1,
    "seed_resize_from_w": -1,
    "s_noise": 1.0,
    "override_settings_restore_afterwards": True,
    "send_images": True,
    "resize_mode": 0,
    "initial_noise_multiplier": 1.0,
    "image_cfg_scale": 1.5,
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


def generation_request(body: A1111Request, img2img: bool) -> GenerationRequest:
    _refuse_what_is_on(body)
    if img2img and len(body.init_images) != 1:
        raise InvalidRequest("init_images: img2img takes exactly one image", "init_images")
    if not img2img and body.init_images:
        raise InvalidRequest("init_images: txt2img takes no image; use /sdapi/v1/img2img", "init_images")
    if img2img and body.denoising_strength == 0:
        raise InvalidRequest("denoising_strength: 0 would return the input unchanged; use (0, 1]", "denoising_strength")
    model = body.override_settings.get("sd_model_checkpoint")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest(
            "override_settings.sd_model_checkpoint: must be a model name (a string)",
            "override_settings.sd_model_checkpoint",
        )
    scheduler = _scheduler(body)
    prompt, loras = take_loras(body.prompt)
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=body.negative_prompt,
        model=title_name(model) if model else None,
        width=body.width,
        height=body.height,
        steps=body.steps,
        guidance_scale=body.cfg_scale,
        seed=None if body.seed == -1 else body.seed,
        n=body.batch_size * body.n_iter,  # A1111's seeds run on across batches too: seed + i
        scheduler=scheduler,
        eta=_eta(body, scheduler),
        image=body.init_images[0] if img2img else None,
        strength=body.denoising_strength if img2img and body.denoising_strength else 0.75,
        **_inpainting(body, img2img),
        hires_fix=_hires_fix(body, img2img),
        loras=[] if body.disable_extra_networks else loras,
        refiner={"model": title_name(body.refiner_checkpoint), "switch_at": body.refiner_switch_at or 0.8}
        if body.refiner_checkpoint
        else None,
        **control_units(body, img2img),
        priority=body.priority,
    )


def _hires_fix(body: A1111Request, img2img: bool) -> dict[str, Any] | None:
    if not body.enable_hr or img2img:  # A1111's img2img has no hires fix and ignores the flag
        return None
    upscaler = upscaler_id(body.hr_upscaler or "Latent")  # (an unknown one is refused with the served ones named)
    if upscaler.startswith("latent") and upscaler != "latent":
        raise InvalidRequest(
            f"hr_upscaler: '{body.hr_upscaler}' is not available here; the latent upscaler is 'Latent'", "hr_upscaler"
        )
    size = {"width": body.hr_resize_x, "height": body.hr_resize_y} if body.hr_resize_x and body.hr_resize_y else {}
    return {
        "scale": body.hr_scale,
        **size,
        "upscaler": upscaler,
        "strength": body.denoising_strength or 0.7,
        "steps": body.hr_second_pass_steps or None,
    }


def _inpainting(body: A1111Request, img2img: bool) -> dict[str, Any]:
    if body.mask is None:
        return {}
    if not img2img:
        raise InvalidRequest("mask: txt2img takes no mask; use /sdapi/v1/img2img", "mask")
    if body.inpainting_fill not in (0, 1):
        raise InvalidRequest(
            f"inpainting_fill: {body.inpainting_fill} (latent noise/nothing) is not available; "
            "use 0 (fill) or 1 (original)",
            "inpainting_fill",
        )
    return {
        "mask": body.mask,
        "mask_blur": body.mask_blur,
        "mask_invert": bool(body.inpainting_mask_invert),
        "masked_content": "fill" if body.inpainting_fill == 0 else "original",
        "masked_area_only": body.inpaint_full_res,
        "masked_area_padding": body.inpaint_full_res_padding,
    }


def _scheduler(body: A1111Request) -> str | None:
    sampler, field = (body.sampler_name, "sampler_name") if body.sampler_name else (body.sampler_index, "sampler_index")
    schedule = (body.scheduler or "automatic").strip().lower()
    if schedule not in ("automatic", "karras"):
        raise InvalidRequest(
            f"scheduler: '{body.scheduler}' is not available here; use Automatic or Karras", "scheduler"
        )
    if not sampler:
        return None
    name = sampler.strip().lower()
    karras = name.endswith(" karras") or schedule == "karras"
    base = SAMPLER_NAMES.get(name) or SAMPLER_NAMES.get(name.removesuffix(" karras"))
    if base is None:
        raise InvalidRequest(
            f"{field}: unknown sampler '{sampler}'; known: {', '.join(spec.label for spec in SCHEDULERS.values())}",
            field,
        )
    return KARRAS.get(base, base) if karras else base


def _eta(body: A1111Request, scheduler: str | None) -> float | None:
    """DDIM takes eta; the ancestral samplers here add full noise (A1111's eta 1.0); the
    others have no eta, and A1111 ignores it for them too."""
    if body.eta is None or scheduler is None:
        return None
    if scheduler == "ddim":
        return body.eta
    if scheduler in ANCESTRAL and body.eta != 1.0:
        raise InvalidRequest(f"eta: the ancestral samplers here run at eta 1.0 only (sent {body.eta})", "eta")
    return None


def _refuse_what_is_on(body: A1111Request) -> None:
    refuse_what_is_on(body.model_extra, off=OFF)
    unknown = set(body.override_settings) - {"sd_model_checkpoint"}
    if unknown:
        raise InvalidRequest(
            f"override_settings: only sd_model_checkpoint is supported, not {', '.join(sorted(unknown))}",
            "override_settings",
        )


def render(body: A1111Request, result: GenerationResult) -> dict[str, Any]:
    request = result.request
    info = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": result.seeds[0],
        "all_seeds": result.seeds,
        "width": request.width,
        "height": request.height,
        "steps": request.steps,
        "cfg_scale": request.guidance_scale,
        "sampler_name": SCHEDULERS[request.scheduler].label,
        "sd_model_name": result.model,
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
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
    running = job if job is not None and job.status == JobStatus.RUNNING else None
    return {
        "progress": running.percent / 100 if running else 0.0,
        "eta_relative": (running.eta_s or 0.0) if running else 0.0,
        "state": {
            "skipped": False,
            "interrupted": job is not None and job.stop_requested_at is not None,
            "job": "running" if running else "",
            "job_count": 1 if running else 0,
            "job_timestamp": "0",
            "job_no": 0,
            "sampling_step": running.step if running else 0,
            "sampling_steps": running.total_steps if running else 0,
        },
        "current_image": base64.b64encode(running.preview).decode()
        if running and preview and running.preview
        else None,
        "textinfo": None,
    }
