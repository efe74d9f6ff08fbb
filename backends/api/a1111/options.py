"""A1111's options, as a generation's `override_settings` and `POST /sdapi/v1/options` carry
them. A1111 accepts any of its few hundred options there; so does this server, in three kinds:

- those that change the picture and that this server honours: `sd_model_checkpoint` (the
  model), `CLIP_stop_at_last_layers` (clip skip), and the VAE (`sd_vae`, Forge's
  `forge_additional_modules`), which may name the VAE the server runs and nothing else;
- those that change A1111's picture and that this server cannot honour (`UNHONOURED`): a 400
  naming the option, unless sent at A1111's own default;
- everything else (saving, grids, previews, the UI, speed and memory switches): accepted, and
  it changes nothing.
"""

from __future__ import annotations

from typing import Any

from backends.api.a1111.protocol import title_name
from backends.api.composition.caller_options import MODEL_OPTION
from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.protocol import MAX_CLIP_SKIP

CLIP_SKIP_OPTION = "CLIP_stop_at_last_layers"
OWN_VAE = ("automatic", "none", "")  # A1111's names for "the model's own VAE"
# The options this server acts on, at A1111's defaults: GET /options shows them beside the
# caller's own (Open WebUI posts the whole dict back with one key changed).
DEFAULT_OPTIONS: dict[str, Any] = {"sd_vae": "Automatic", CLIP_SKIP_OPTION: 1, "forge_additional_modules": []}

# Options that change A1111's picture and have no counterpart here, at A1111's defaults.
UNHONOURED: dict[str, Any] = {
    "eta_noise_seed_delta": 0,
    "randn_source": "GPU",
    "sd_unet": "Automatic",
    "sdxl_clip_l_skip": False,
    "emphasis": "Original",
    "enable_emphasis": True,
    "use_old_emphasis_implementation": False,
    "comma_padding_backtrack": 20,
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_tmax": 0.0,
    "s_noise": 1.0,
    "s_min_uncond": 0.0,
    "eta_ddim": 0.0,
    "eta_ancestral": 1.0,
    "sigma_min": 0.0,
    "sigma_max": 0.0,
    "rho": 0.0,
    "k_sched_type": "Automatic",
    "always_discard_next_to_last_sigma": False,
    "sgm_noise_multiplier": False,
    "uni_pc_variant": "bh1",
    "uni_pc_skip_type": "time_uniform",
    "uni_pc_order": 3,
    "initial_noise_multiplier": 1.0,
    "img2img_extra_noise": 0.0,
    "img2img_color_correction": False,
    "img2img_fix_steps": False,
    "sdxl_crop_top": 0,
    "sdxl_crop_left": 0,
    "sdxl_refiner_low_aesthetic_score": 2.5,
    "sdxl_refiner_high_aesthetic_score": 6.0,
    "token_merging_ratio": 0.0,
    "token_merging_ratio_img2img": 0.0,
    "token_merging_ratio_hr": 0.0,
    "extra_networks_default_multiplier": 1.0,
    "hires_fix_use_firstpass_conds": False,
    "sd_vae_encode_method": "Full",
    "sd_vae_decode_method": "Full",
    "hypertile_enable_unet": False,
    "hypertile_enable_vae": False,
}


def picture_fields(options: dict[str, Any], served_vae: str | None, prefix: str) -> dict[str, Any]:
    """The request fields `options` ask for (`model`, `clip_skip`); an option this server cannot
    honour is an `InvalidRequest` naming it (`prefix` + its name)."""
    for name, default in UNHONOURED.items():
        value = options.get(name)
        if value is not None and value != default:
            raise InvalidRequest(
                f"{prefix}{name}: not supported by this server (sent {value!r}; A1111's default is {default!r})",
                prefix + name,
            )
    fields: dict[str, Any] = {}
    model = options.get(MODEL_OPTION)
    if model is not None:
        if not isinstance(model, str):
            raise InvalidRequest(f"{prefix}{MODEL_OPTION}: must be a model name (a string)", prefix + MODEL_OPTION)
        fields["model"] = title_name(model)
    if options.get(CLIP_SKIP_OPTION) is not None:
        fields["clip_skip"] = clip_skip(options[CLIP_SKIP_OPTION], prefix + CLIP_SKIP_OPTION)
    check_vae(options.get("sd_vae"), served_vae, prefix + "sd_vae")
    modules = options.get("forge_additional_modules") or []
    if not isinstance(modules, list):
        modules = [modules]
    for module in modules:
        check_vae(module, served_vae, prefix + "forge_additional_modules")
    return fields


def clip_skip(value: Any, field: str) -> int:
    """A1111's clip skip for SDXL as Forge reads it: the layer max(n, 2) from the last, in both
    text encoders. So 1 and 2 give SDXL's own penultimate layer, which is also all that A1111
    itself reads for SDXL (its "Clip skip SDXL" option off, the default); 3 and up read deeper."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise InvalidRequest(f"{field}: a whole number 1..{MAX_CLIP_SKIP}, not {value!r}", field)
    if not 1 <= value <= MAX_CLIP_SKIP:
        raise InvalidRequest(f"{field}: {value} is outside 1..{MAX_CLIP_SKIP}", field)
    return max(int(value), 2)


def check_vae(name: Any, served_vae: str | None, field: str) -> None:
    """A VAE named by A1111 or Forge: the model's own ("Automatic", "None"), or the one this
    server runs in place of every model's (SDXL_VAE), by id or file name."""
    if name is None or (isinstance(name, str) and name.strip().lower() in OWN_VAE):
        return
    if served_vae is not None and name in (served_vae, vae_file(served_vae)):
        return
    served = f"'{served_vae}' (SDXL_VAE) or " if served_vae else ""
    raise InvalidRequest(f"{field}: VAE {name!r} is not served here; use {served}'Automatic' (the model's own)", field)


def vae_file(vae_id: str) -> str:
    """The file name A1111's and Forge's listings give the served VAE."""
    return f"{vae_id}.safetensors"
