"""Schedulers (samplers) by friendly name: a solver and a noise schedule, both real diffusers
configurations (the Karras, exponential and beta sigmas, "trailing" spacing for SGM uniform,
Align Your Steps' published SDXL sigmas).

Each request gets a fresh scheduler built from the model's stored scheduler config plus the
named variant, so a scheduler chosen by one request never leaks into the next.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the list below is read where diffusers is not loaded (BentoML's main process)
    from diffusers.schedulers.scheduling_utils import SchedulerMixin


@dataclass(frozen=True)
class SchedulerSpec:
    class_name: str  # a scheduler class of diffusers
    label: str  # the name AUTOMATIC1111-style tools show
    options: dict[str, Any] = field(default_factory=dict)
    align_your_steps: bool = False  # sigmas from Align Your Steps' SDXL schedule
    zero_snr: bool = True  # it can run a model trained with zero-terminal SNR (rescale_betas_zero_snr)


SCHEDULERS: dict[str, SchedulerSpec] = {
    "euler": SchedulerSpec("EulerDiscreteScheduler", "Euler"),
    "euler_karras": SchedulerSpec("EulerDiscreteScheduler", "Euler Karras", {"use_karras_sigmas": True}),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler", "Euler a"),
    "heun": SchedulerSpec("HeunDiscreteScheduler", "Heun", zero_snr=False),
    "lms": SchedulerSpec("LMSDiscreteScheduler", "LMS", zero_snr=False),
    "ddim": SchedulerSpec("DDIMScheduler", "DDIM"),
    "dpmpp_2m": SchedulerSpec("DPMSolverMultistepScheduler", "DPM++ 2M"),
    "dpmpp_2m_karras": SchedulerSpec("DPMSolverMultistepScheduler", "DPM++ 2M Karras", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde_karras": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        "DPM++ 2M SDE Karras",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpmpp_sde_karras": SchedulerSpec(
        "DPMSolverSDEScheduler", "DPM++ SDE Karras", {"use_karras_sigmas": True}, zero_snr=False
    ),
    "dpmpp_2m_exponential": SchedulerSpec(
        "DPMSolverMultistepScheduler", "DPM++ 2M Exponential", {"use_exponential_sigmas": True}
    ),
    "dpmpp_2m_beta": SchedulerSpec("DPMSolverMultistepScheduler", "DPM++ 2M Beta", {"use_beta_sigmas": True}),
    "dpmpp_3m_sde_karras": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        "DPM++ 3M SDE Karras",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_karras_sigmas": True},
    ),
    "euler_sgm_uniform": SchedulerSpec("EulerDiscreteScheduler", "Euler SGM Uniform", {"timestep_spacing": "trailing"}),
    "euler_simple": SchedulerSpec("EulerDiscreteScheduler", "Euler Simple", {"timestep_spacing": "linspace"}),
    "euler_ays": SchedulerSpec("EulerDiscreteScheduler", "Euler Align Your Steps", align_your_steps=True),
    "dpm2": SchedulerSpec("KDPM2DiscreteScheduler", "DPM2", zero_snr=False),
    # PLMS, as SD pipelines run it
    "pndm": SchedulerSpec("PNDMScheduler", "PNDM", {"skip_prk_steps": True}, zero_snr=False),
    "unipc": SchedulerSpec("UniPCMultistepScheduler", "UniPC"),
    "lcm": SchedulerSpec("LCMScheduler", "LCM"),
    "tcd": SchedulerSpec("TCDScheduler", "TCD"),  # TCD LoRAs' few-step solver; eta is its gamma
}
ETA_SCHEDULERS = ("ddim", "tcd")  # the schedulers whose step takes eta (its stochasticity)

# The names moondream-station's SDXL backend (and so the gallery) sends, ids and aliases, for
# the scheduler here that is what the name says. Names that are not here (its "restart",
# "dpm_solver", ...) are answered by the model's default scheduler, and the answer says so.
MOONDREAM_NAMES: dict[str, str] = {
    "dpm_pp_2m_karras": "dpmpp_2m_karras",
    "karras": "dpmpp_2m_karras",
    "dpm_pp_2m_sde_karras": "dpmpp_2m_sde_karras",
    "dpmpp_2m_sde_gpu": "dpmpp_2m_sde_karras",
    "beta": "dpmpp_2m_beta",
    "beta_schedule": "dpmpp_2m_beta",
    "exponential": "dpmpp_2m_exponential",
    "exp": "dpmpp_2m_exponential",
    "align_your_steps": "euler_ays",
    "ays": "euler_ays",
    "sgm_uniform": "euler_sgm_uniform",
    "uniform": "euler_sgm_uniform",
    "simple": "euler_simple",
    "normal": "euler_simple",
    "linear": "euler_simple",
    "dpm_pp_2m": "dpmpp_2m",
    "dpm++": "dpmpp_2m",
    "euler_ancestral": "euler_a",
    "euler_discrete": "euler",
    "kdpm2": "dpm2",
    "dpmpp_3m_sde_gpu": "dpmpp_3m_sde_karras",
    "dpmpp_sde_gpu": "dpmpp_sde_karras",
}

# Align Your Steps' noise levels for SDXL at 10 steps (as diffusers publishes them, final 0 left
# out); other step counts interpolate them log-linearly, as the paper does.
AYS_SDXL_SIGMAS = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113)


def align_your_steps_sigmas(steps: int) -> list[float]:
    """`steps` noise levels from Align Your Steps' SDXL schedule, then 0."""
    logs = [math.log(sigma) for sigma in AYS_SDXL_SIGMAS]
    last = len(logs) - 1
    sigmas = []
    for i in range(steps):
        position = last * i / (steps - 1) if steps > 1 else 0.0
        low = min(int(position), last - 1)
        sigmas.append(math.exp(logs[low] + (logs[low + 1] - logs[low]) * (position - low)))
    return [*sigmas, 0.0]


@dataclass(frozen=True)
class ModelSampling:
    """A model's own sampling facts, from its stored scheduler config: what its UNet predicts
    (epsilon, or v for v-prediction models such as NoobAI-XL's v-pred line) and whether it was
    trained with zero-terminal SNR. Every scheduler a request picks keeps them."""

    prediction_type: str = "epsilon"
    zero_snr: bool = False


def model_sampling(path: Path) -> ModelSampling:
    """The sampling facts of the stored pipeline at `path`."""
    config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return ModelSampling(config.get("prediction_type", "epsilon"), bool(config.get("rescale_betas_zero_snr")))


def resolve_moondream_name(name: str) -> str | None:
    """A scheduler id for a name a moondream-station client sends; None: no such scheduler."""
    name = name.strip().lower()
    return name if name in SCHEDULERS else MOONDREAM_NAMES.get(name)


def step_arguments(name: str, steps: int) -> dict[str, Any]:
    """How a pipeline call asks for `steps` steps with this scheduler."""
    if SCHEDULERS[name].align_your_steps:
        return {"sigmas": align_your_steps_sigmas(steps)}
    return {"num_inference_steps": steps}


def make_scheduler(name: str, base_config: dict[str, Any], timestep_spacing: str | None = None) -> SchedulerMixin:
    """A new scheduler of the named kind, on the model's noise schedule (betas, timesteps)."""
    import diffusers  # here, not at the top: see TYPE_CHECKING above

    spec = SCHEDULERS[name]
    options = dict(spec.options)
    if timestep_spacing:
        options["timestep_spacing"] = timestep_spacing
    return getattr(diffusers, spec.class_name).from_config(base_config, **options)
