"""The AUTOMATIC1111 dialect's meaning: an A1111 request as a `GenerationRequest` (refused with
a 400 naming the field when it asks for what this server does not do), and a result or a running
job shaped as A1111 answers them. No server in here: tests/test_a1111_mapping.py calls it as is."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from backends.api.a1111.extras import upscaler_id
from backends.api.a1111.options import clip_skip as clip_skip_of
from backends.api.a1111.options import picture_fields
from backends.api.a1111.protocol import (
    CFG_RESCALE_SCRIPT,
    PAG_SCRIPT,
    A1111Answer,
    A1111Request,
    refuse_what_is_on,
    title_name,
)
from backends.api.a1111.units import control_units
from backends.api.composition.caller_options import MODEL_OPTION
from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.generation import infotext
from backends.sdxl_backend.jobs import Job, JobStatus
from backends.sdxl_backend.models.schedulers import SCHEDULERS
from backends.sdxl_backend.protocol import GenerationRequest, GenerationResult
from backends.sdxl_backend.units import MAX_LORAS, LoraWeight

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
# A1111 1.9 on names the solver alone ("DPM++ 2M SDE") and the schedule apart.
SAMPLER_NAMES |= {"dpm++ 2m sde": "dpmpp_2m_sde", "dpm++ sde": "dpmpp_sde", "dpm++ 3m sde": "dpmpp_3m_sde"}
# A1111's noise schedules (its `scheduler` field, as /sdapi/v1/schedulers names them) with a
# sampler: the scheduler here that runs the pair. "automatic" is the sampler's own default in
# A1111 (Karras for DPM++ 2M and DPM++ SDE, none for the rest). A1111 runs DDIM, PLMS, UniPC
# and LCM on their own schedules, ignoring the field; so does this server.
SCHEDULES = {
    "automatic": "Automatic",
    "karras": "Karras",
    "exponential": "Exponential",
    "beta": "Beta",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "normal": "Normal",
    "align_your_steps": "Align Your Steps",
}
PAIRS = {
    ("euler", "karras"): "euler_karras",
    ("euler", "sgm_uniform"): "euler_sgm_uniform",
    ("euler", "simple"): "euler_simple",
    ("euler", "normal"): "euler_simple",
    ("euler", "align_your_steps"): "euler_ays",
    ("dpmpp_2m", "karras"): "dpmpp_2m_karras",
    ("dpmpp_2m", "exponential"): "dpmpp_2m_exponential",
    ("dpmpp_2m", "beta"): "dpmpp_2m_beta",
    ("dpmpp_2m_sde", "karras"): "dpmpp_2m_sde_karras",
    ("dpmpp_sde", "karras"): "dpmpp_sde_karras",
    ("dpmpp_3m_sde", "karras"): "dpmpp_3m_sde_karras",
}
AUTOMATIC = {"dpmpp_2m": "karras", "dpmpp_sde": "karras"}  # (A1111's 2M SDE and 3M SDE: exponential, not here)
OWN_SCHEDULE = {"ddim", "pndm", "unipc", "lcm"}
ANCESTRAL = {"euler_a"}

# A1111 fields this server does not implement, at the values A1111 sends when they are off.
OFF = {
    "subseed": -1,
    "seed_resize_from_h": -1,
    "seed_resize_from_w": -1,
    "s_noise": 1.0,
    "resize_mode": 0,
    "initial_noise_multiplier": 1.0,
    "image_cfg_scale": 1.5,
    "hr_additional_modules": ["Use same choices"],  # Forge's: the hires pass's VAE and text encoders
}
# Fields clients send that change nothing in the answer: SillyTavern forwards its own `url` and
# `auth` inside the body; saving to the server's disk and grids are A1111's, not this server's.
IGNORED = {
    "url",
    "auth",
    "save_images",
    "send_images",
    "do_not_save_samples",
    "do_not_save_grid",
    "override_settings_restore_afterwards",
    "force_task_id",
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


def generation_request(
    body: A1111Request, img2img: bool, kept: dict[str, Any] | None = None, served_vae: str | None = None
) -> GenerationRequest:
    """`kept`: the options the caller set with POST /options, under the request's own
    `override_settings`; `served_vae`: the VAE the server runs (SDXL_VAE), if any."""
    refuse_what_is_on({name: value for name, value in (body.model_extra or {}).items() if name not in IGNORED}, off=OFF)
    if img2img and len(body.init_images) != 1:
        raise InvalidRequest("init_images: img2img takes exactly one image", "init_images")
    if not img2img and body.init_images:
        raise InvalidRequest("init_images: txt2img takes no image; use /sdapi/v1/img2img", "init_images")
    if img2img and body.denoising_strength == 0:
        raise InvalidRequest("denoising_strength: 0 would return the input unchanged; use (0, 1]", "denoising_strength")
    kept_fields = picture_fields({k: v for k, v in (kept or {}).items() if k != MODEL_OPTION}, served_vae, "options.")
    overrides = picture_fields(body.override_settings, served_vae, "override_settings.")
    clip_skip = overrides.get("clip_skip")
    if clip_skip is None and body.clip_skip is not None:
        clip_skip = clip_skip_of(body.clip_skip, "clip_skip")
    scheduler = _scheduler(body)
    prompt, loras = take_loras(body.prompt)
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=body.negative_prompt,
        # (without: the caller's default from the options already read here, else the server's)
        model=overrides.get("model") or (kept or {}).get(MODEL_OPTION),
        width=body.width,
        height=body.height,
        steps=body.steps,
        guidance_scale=body.cfg_scale,
        seed=None if body.seed == -1 else body.seed,
        n=body.batch_size * body.n_iter,  # A1111's seeds run on across batches too: seed + i
        scheduler=scheduler,
        eta=_eta(body, scheduler),
        clip_skip=clip_skip or kept_fields.get("clip_skip"),
        guidance_rescale=_cfg_rescale(body),
        pag_scale=_pag(body),
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


def _script_args(body: A1111Request, title: str, shape: str) -> tuple[str, list[Any]] | None:
    """An alwayson script's args and their field name, found by its title in any case; None
    when the request does not send it. `shape` says what the args must be, for the 400."""
    script = next((value for name, value in body.alwayson_scripts.items() if name.strip().lower() == title), None)
    if not script:
        return None
    field = f"alwayson_scripts.{title}.args"
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list) or not args:
        raise InvalidRequest(f"{field}: must be {shape}", field)
    return field, args


def _number(field: str, value: Any, low: float, high: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidRequest(f"{field}: {what} is a number {low:g}..{high:g}, not {value!r}", field)
    return float(value)


def _cfg_rescale(body: A1111Request) -> float | None:
    """The CFG Rescale extension's alwayson script: its first arg is the rescale (phi); the
    others are switches this server does not have (Auto Color Fix, DDIM Trailing, keeping the
    unfixed image), refused by name when on."""
    found = _script_args(body, CFG_RESCALE_SCRIPT, "[rescale, ...], the rescale a number 0..1")
    if found is None:
        return None
    field, args = found
    rescale = _number(f"{field}[0]", args[0], 0, 1, "the rescale")
    for index, switch in enumerate(args[1:], start=1):
        if switch is True:
            raise InvalidRequest(
                f"{field}[{index}]: not supported by this server (only the rescale)", f"{field}[{index}]"
            )
    return rescale


def _pag(body: A1111Request) -> float:
    """Forge's built-in PAG script: [enabled, scale, attenuation, start step, end step] (its
    first versions send the first two). PAG here acts at every step at its full scale, so
    attenuation is 0 and the steps run 0 to 1 (Forge's defaults), or a 400 names the arg."""
    found = _script_args(body, PAG_SCRIPT, "[enabled, scale, attenuation, start step, end step]")
    if found is None or found[1][0] is not True:
        return 0.0
    field, args = found
    if len(args) < 2:
        raise InvalidRequest(f"{field}: the scale follows `enabled`", field)
    for index, wanted, name in ((2, 0, "attenuation"), (3, 0, "start step"), (4, 1, "end step")):
        if len(args) > index and args[index] != wanted:
            raise InvalidRequest(
                f"{field}[{index}]: PAG runs every step at its full scale here: the {name} is {wanted}",
                f"{field}[{index}]",
            )
    return _number(f"{field}[1]", args[1], 0, 10, "PAG's scale")


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
    """The scheduler for A1111's sampler and schedule: one name ("DPM++ 2M Karras", A1111 before
    1.9), or the two fields ("DPM++ 2M" and "Karras"), which give the same pixels."""
    sampler, field = (body.sampler_name, "sampler_name") if body.sampler_name else (body.sampler_index, "sampler_index")
    schedule = (body.scheduler or "automatic").strip().lower().replace(" ", "_")
    if schedule not in SCHEDULES:
        raise InvalidRequest(
            f"scheduler: '{body.scheduler}' is not available here; known: {', '.join(SCHEDULES.values())}", "scheduler"
        )
    if not sampler:
        return None
    name = sampler.strip().lower()
    named = SAMPLER_NAMES.get(name)
    if named in SCHEDULERS and SCHEDULERS[named].options:
        return named  # a name that says its schedule already ("DPM++ 2M Karras", "Euler SGM Uniform")
    base = named or SAMPLER_NAMES.get(name.removesuffix(" karras"))
    if base is None:
        raise InvalidRequest(
            f"{field}: unknown sampler '{sampler}'; known: {', '.join(spec.label for spec in SCHEDULERS.values())}",
            field,
        )
    if named is None:  # "<sampler> Karras" of a sampler without a Karras form: the sampler as is
        return PAIRS.get((base, "karras"), base)
    if base in OWN_SCHEDULE:
        return base
    schedule = AUTOMATIC.get(base, schedule) if schedule == "automatic" else schedule
    if schedule == "automatic" and base in SCHEDULERS:
        return base
    if (base, schedule) not in PAIRS:
        takes = ["Automatic"] * (base in SCHEDULERS) + [SCHEDULES[s] for (b, s) in PAIRS if b == base]
        raise InvalidRequest(
            f"scheduler: '{body.scheduler}' does not combine with sampler '{sampler}' here; it takes "
            f"{', '.join(takes)}",
            "scheduler",
        )
    return PAIRS[base, schedule]


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
        "clip_skip": request.clip_skip,
        "guidance_rescale": request.guidance_rescale,
        # Each image's parameters text, as its PNG carries it (LibreChat reads infotexts[0]).
        "infotexts": [infotext.write(request, seed, result.img2img, result.inpainting) for seed in result.seeds],
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
