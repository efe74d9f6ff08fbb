"""Schedulers (samplers) by friendly name.

Each request gets a fresh scheduler built from the model's stored scheduler config plus the
named variant, so a scheduler chosen by one request never leaks into the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the list below is read where diffusers is not loaded (BentoML's main process)
    from diffusers.schedulers.scheduling_utils import SchedulerMixin


@dataclass(frozen=True)
class SchedulerSpec:
    class_name: str  # a scheduler class of diffusers
    label: str  # the name AUTOMATIC1111-style tools show
    options: dict[str, Any] = field(default_factory=dict)


SCHEDULERS: dict[str, SchedulerSpec] = {
    "euler": SchedulerSpec("EulerDiscreteScheduler", "Euler"),
    "euler_karras": SchedulerSpec("EulerDiscreteScheduler", "Euler Karras", {"use_karras_sigmas": True}),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler", "Euler a"),
    "heun": SchedulerSpec("HeunDiscreteScheduler", "Heun"),
    "lms": SchedulerSpec("LMSDiscreteScheduler", "LMS"),
    "ddim": SchedulerSpec("DDIMScheduler", "DDIM"),
    "dpmpp_2m": SchedulerSpec("DPMSolverMultistepScheduler", "DPM++ 2M"),
    "dpmpp_2m_karras": SchedulerSpec("DPMSolverMultistepScheduler", "DPM++ 2M Karras", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde_karras": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        "DPM++ 2M SDE Karras",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "dpmpp_sde_karras": SchedulerSpec("DPMSolverSDEScheduler", "DPM++ SDE Karras", {"use_karras_sigmas": True}),
    "unipc": SchedulerSpec("UniPCMultistepScheduler", "UniPC"),
    "lcm": SchedulerSpec("LCMScheduler", "LCM"),
}


def make_scheduler(name: str, base_config: dict[str, Any], timestep_spacing: str | None = None) -> SchedulerMixin:
    """A new scheduler of the named kind, on the model's noise schedule (betas, timesteps)."""
    import diffusers  # here, not at the top: see TYPE_CHECKING above

    spec = SCHEDULERS[name]
    options = dict(spec.options)
    if timestep_spacing:
        options["timestep_spacing"] = timestep_spacing
    return getattr(diffusers, spec.class_name).from_config(base_config, **options)
