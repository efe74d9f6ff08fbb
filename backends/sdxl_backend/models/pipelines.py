"""Pipelines from a store directory, and the memory modes they run in.

Only torch, diffusers and safetensors here, so that bench/gpu_sdxl.py can load and place
pipelines exactly as the service does on a machine without the rest of the stack. The speed
settings applied at load are in fast_paths.py.

Memory modes:
- `high`: every component resident on the device;
- `balanced`: model CPU offload (one component on the device at a time) plus VAE slicing
  and tiling;
- `low`: sequential CPU offload (layer by layer), VAE slicing and tiling; the model
  manager also frees the model after each request in this mode.
Offload needs an accelerator: on the CPU the modes differ in VAE slicing/tiling only.
"""

from __future__ import annotations

import copy
import functools
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    ControlNetUnionModel,
    DiffusionPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPAGImg2ImgPipeline,
    StableDiffusionXLControlNetPAGPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLControlNetUnionImg2ImgPipeline,
    StableDiffusionXLControlNetUnionInpaintPipeline,
    StableDiffusionXLControlNetUnionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPAGImg2ImgPipeline,
    StableDiffusionXLPAGInpaintPipeline,
    StableDiffusionXLPAGPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from safetensors import safe_open

from backends.sdxl_backend.device import Placement
from backends.sdxl_backend.models.controlnets import union_control_types
from backends.sdxl_backend.models.fast_paths import FastPaths, apply_fast_paths
from backends.sdxl_backend.models.modes import MEMORY_MODES
from backends.sdxl_backend.models.schedulers import make_scheduler
from backends.sdxl_backend.prompts.encoder import EncodedPrompts

P = ParamSpec("P")
T = TypeVar("T")
# One load at a time in the process, whichever device thread asks: diffusers and transformers
# build a model's modules under accelerate's `init_empty_weights`, which patches torch.nn.Module
# for every thread while it lasts, so a model another thread builds meanwhile gets its weights
# on the meta device (seen with SDXL_DEVICES=cpu,cpu warming up both at once).
LOADING = threading.RLock()


def loading_alone(load: Callable[P, T]) -> Callable[P, T]:
    @functools.wraps(load)
    def alone(*args: P.args, **kwargs: P.kwargs) -> T:
        with LOADING:
            return load(*args, **kwargs)

    return alone


@dataclass
class Pipelines:
    """The pipelines over one set of components (no second copy of the weights)."""

    txt2img: StableDiffusionXLPipeline | None  # None for img2img-only models (the refiner)
    img2img: StableDiffusionXLImg2ImgPipeline
    inpaint: StableDiffusionXLInpaintPipeline
    # The stored scheduler config: every request's scheduler starts from it, never from the
    # previous request's scheduler, whose variant options would carry over.
    scheduler_config: dict
    mode: str = "high"  # one of MEMORY_MODES once placed
    _schedulers: dict = field(default_factory=dict, repr=False)  # pristine ones, by (name, timestep spacing)
    encoded_prompts: EncodedPrompts = field(default_factory=EncodedPrompts, repr=False)
    # The IP-Adapters installed in the UNet (ip_adapters.py; None: an install that failed), and
    # its own attention processors, which come back when a call has none.
    ip_adapters: tuple[str, ...] | None = ()
    plain_attention: dict = field(default_factory=dict, repr=False)

    def new_scheduler(self, name: str, timestep_spacing: str | None) -> SchedulerMixin:
        """A fresh scheduler of the named kind on the model's noise schedule: a copy of one made
        once (made from the config each time, it cost a millisecond and more a request)."""
        key = (name, timestep_spacing)
        if key not in self._schedulers:
            self._schedulers[key] = make_scheduler(name, self.scheduler_config, timestep_spacing)
        return copy.deepcopy(self._schedulers[key])

    @property
    def owner(self) -> DiffusionPipeline:
        """The pipeline that carries the offload hooks (they act on the shared modules)."""
        return self.txt2img or self.img2img


def weights_variant(path: Path) -> str | None:
    """Hub imports keep the fp16 file names of the repository; diffusers reads them as a variant.
    `path` is a pipeline's directory (weights one level down) or a component's (at the top)."""
    return "fp16" if any(path.glob("*.fp16.safetensors")) or any(path.glob("*/*.fp16.safetensors")) else None


@loading_alone
def load_pipelines(
    path: Path, placement: Placement, mode: str = "high", fast: FastPaths = FastPaths(), vae: Path | None = None
) -> Pipelines:
    """Read a diffusers directory for `mode`, with the VAE stored at `vae` in place of its own
    when given (all SDXL models share one latent space), and the speed settings `fast`.

    In `high` mode the weights go straight onto the device in the target dtype (diffusers
    materialises each tensor from the safetensors file where `device_map` says: no float32
    detour, no second copy in host memory); in the offload modes they load into host memory,
    and the offload hooks bring each part to the device when it runs, so a model larger than
    the device's free memory still loads."""
    on_device = mode == "high" or placement.device.type == "cpu"
    target = placement.device if on_device else torch.device("cpu")
    direct = target.type == "cpu" or target.index in (None, 0)
    replaced = (
        {}
        if vae is None
        else {
            "vae": AutoencoderKL.from_pretrained(
                vae,
                dtype=placement.dtype,
                variant=weights_variant(vae),
                use_safetensors=True,
                local_files_only=True,
                device_map=target.type if direct else None,
            )
        }
    )
    base = DiffusionPipeline.from_pretrained(
        path,
        dtype=placement.dtype,
        variant=weights_variant(path),
        use_safetensors=True,
        local_files_only=True,
        device_map=target.type if direct else None,
        **replaced,
    )
    if not direct:
        base.to(target)
    base.set_progress_bar_config(disable=True)
    apply_fast_paths(base, fast)
    if isinstance(base, StableDiffusionXLPipeline):
        img2img = StableDiffusionXLImg2ImgPipeline(
            **base.components, force_zeros_for_empty_prompt=base.config.force_zeros_for_empty_prompt
        )
        txt2img = base
    elif isinstance(base, StableDiffusionXLImg2ImgPipeline):
        img2img, txt2img = base, None
    else:
        raise ValueError(f"{path} holds a {type(base).__name__}, not an SDXL pipeline")
    inpaint = StableDiffusionXLInpaintPipeline(
        **img2img.components,
        **{key: img2img.config[key] for key in ("requires_aesthetics_score", "force_zeros_for_empty_prompt")},
    )
    for pipeline in (img2img, inpaint):
        pipeline.set_progress_bar_config(disable=True)
    pipelines = Pipelines(txt2img, img2img, inpaint, dict(base.scheduler.config))
    pipelines.mode = "high" if on_device else "host"  # "host": in host memory, no hooks yet
    apply_memory_mode(pipelines, mode, placement)
    return pipelines


CONTROLNET_PIPELINES = {
    "txt2img": StableDiffusionXLControlNetPipeline,
    "img2img": StableDiffusionXLControlNetImg2ImgPipeline,
    "inpaint": StableDiffusionXLControlNetInpaintPipeline,
}
# A union ControlNet's (one model, its control type per map); diffusers has none with PAG.
UNION_PIPELINES = {
    "txt2img": StableDiffusionXLControlNetUnionPipeline,
    "img2img": StableDiffusionXLControlNetUnionImg2ImgPipeline,
    "inpaint": StableDiffusionXLControlNetUnionInpaintPipeline,
}
# Perturbed-attention guidance (on the layers `pag_layers` names).
PAG_PIPELINES = {
    "txt2img": StableDiffusionXLPAGPipeline,
    "img2img": StableDiffusionXLPAGImg2ImgPipeline,
    "inpaint": StableDiffusionXLPAGInpaintPipeline,
}
CONTROLNET_PAG_PIPELINES = {
    "txt2img": StableDiffusionXLControlNetPAGPipeline,
    "img2img": StableDiffusionXLControlNetPAGImg2ImgPipeline,
}  # (diffusers has no SDXL ControlNet inpainting with PAG: validation.py refuses the pair)


def pag_layers(unet: Any) -> list[str]:
    """Where PAG perturbs the self-attention: SDXL's middle block (what ComfyUI's node perturbs);
    in a UNet without attention there (the tiny test model), its deepest self-attention, the
    first up block's."""
    mid = getattr(unet, "mid_block", None)
    return ["mid"] if mid is not None and getattr(mid, "attentions", None) else ["up_blocks.0"]


def pipeline_for(
    pipelines: Pipelines, task: str, controlnets: list[ControlNetModel], pag: bool = False
) -> DiffusionPipeline:
    """The `task` pipeline ("txt2img", "img2img", "inpaint"), or one made for the call over the
    same components (it holds no weights of its own) when it is guided by `controlnets`
    (several: diffusers combines them) or by PAG."""
    base = getattr(pipelines, task)
    if not controlnets and not pag:
        return base
    config = {
        key: base.config[key]
        for key in ("requires_aesthetics_score", "force_zeros_for_empty_prompt")
        if key in base.config
    }
    if controlnets:
        config["controlnet"] = controlnets if len(controlnets) > 1 else controlnets[0]
    if pag:
        config["pag_applied_layers"] = pag_layers(base.unet)
    if controlnets and isinstance(controlnets[0], ControlNetUnionModel):  # (it guides alone: validation.py)
        kinds = UNION_PIPELINES
    elif controlnets:
        kinds = CONTROLNET_PAG_PIPELINES if pag else CONTROLNET_PIPELINES
    else:
        kinds = PAG_PIPELINES
    pipeline = kinds[task](**base.components, **config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@loading_alone
def load_controlnet(path: Path, placement: Placement) -> ControlNetModel:
    """A stored ControlNet, on the device in the placement's dtype. It stays there in every
    memory mode: it runs beside the UNet at every step."""
    kind = ControlNetUnionModel if union_control_types(path) else ControlNetModel
    controlnet = kind.from_pretrained(
        path, dtype=placement.dtype, variant=weights_variant(path), use_safetensors=True, local_files_only=True
    )
    return controlnet.to(placement.device)


def apply_memory_mode(pipelines: Pipelines, mode: str, placement: Placement) -> None:
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode must be one of {', '.join(MEMORY_MODES)}; got {mode!r}")
    if mode == pipelines.mode:
        return
    owner = pipelines.owner
    if placement.device.type != "cpu":
        owner.remove_all_hooks()
        if mode == "high":
            owner.to(placement.device)
        elif mode == "balanced":
            owner.enable_model_cpu_offload(device=placement.device)
        else:
            owner.enable_sequential_cpu_offload(device=placement.device)
    set_vae_tiling(pipelines, mode != "high")
    pipelines.mode = mode


def set_vae_tiling(pipelines: Pipelines, on: bool) -> None:
    """Slicing (one image of the batch at a time) and tiling (overlapping tiles) bound the
    VAE decode's memory, at some cost in time."""
    vae = pipelines.owner.vae
    if on:
        vae.enable_slicing()
        vae.enable_tiling()
    else:
        vae.disable_slicing()
        vae.disable_tiling()


def weights_bytes(path: Path, dtype: torch.dtype) -> int:
    """A pipeline's weights' size once loaded in `dtype`, from the safetensors headers alone."""
    index = json.loads((path / "model_index.json").read_text())
    return sum(component_bytes(path / component, dtype) for component in index if (path / component).is_dir())


def component_bytes(path: Path, dtype: torch.dtype) -> int:
    """One component's (a UNet's, a ControlNet's...) weights' size once loaded in `dtype`: its
    fp16 files when it has them, as diffusers reads the variant."""
    files = sorted(path.glob("*.safetensors"))
    variant = weights_variant(path)
    total = 0
    for file in [f for f in files if (".fp16." in f.name) == (variant == "fp16")] or files:
        with safe_open(file, framework="pt") as weights:
            for name in weights.keys():
                numel = 1
                for dim in weights.get_slice(name).get_shape():
                    numel *= dim
                total += numel * dtype.itemsize
    return total
