"""The device's part of a generation: one pipeline call for a batch of compatible requests, and
the second pass a request may ask for (the refiner, or a hires fix). Runs on the device thread.

`Denoiser.__call__` goes in numbered steps; the arguments of the call are built per task
(call_arguments.py) on top of those every call has.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from backends.sdxl_backend.errors import BackendError
from backends.sdxl_backend.generation.call_arguments import TASK_ARGUMENTS, control_arguments, generators, per_image
from backends.sdxl_backend.generation.progress import Batch, BatchProgress
from backends.sdxl_backend.generation.sampling import freeu_applied, guidance_arguments
from backends.sdxl_backend.models.ip_adapters import ImagePromptModel, embeddings, install
from backends.sdxl_backend.models.manager import ModelManager
from backends.sdxl_backend.models.pipelines import pipeline_for
from backends.sdxl_backend.models.records import ModelSource
from backends.sdxl_backend.models.schedulers import step_arguments
from backends.sdxl_backend.models.upscalers import Tiling, upscale
from backends.sdxl_backend.prompts.encoder import ConditioningSchedule, conditioning
from backends.sdxl_backend.prompts.reader import PromptReader, ReadPrompts
from backends.sdxl_backend.protocol import ResolvedRequest, Timings
from backends.sdxl_backend.units import LoraWeight

if TYPE_CHECKING:
    from backends.sdxl_backend.generation.prepared import PreparedRequest

# What a ControlNet pipeline call takes beyond the plain one (the control maps aside).
CONTROL_ARGUMENTS = ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end", "guess_mode")
# What the base's call takes and the refiner's does not (the refiner has its own UNet).
BASE_ONLY_ARGUMENTS = ("width", "height", "denoising_end", "strength", "ip_adapter_image_embeds", *CONTROL_ARGUMENTS)


@dataclass(frozen=True)
class OutOfMemorySeam:
    """Test seam: the first `attempts` pipeline calls of every request raise CUDA's
    out-of-memory error at denoising step `step`, so CPU tests can drive the recovery path.
    Set by SDXL_TEST_FAULT_OOM ("ATTEMPTS" or "ATTEMPTS@STEP"); never set in production."""

    attempts: int
    step: int = 1

    @classmethod
    def parse(cls, text: str | None) -> OutOfMemorySeam | None:
        if not text:
            return None
        attempts, _, step = text.partition("@")
        return cls(int(attempts), int(step or 1))


def acting_loras(request: ResolvedRequest) -> list[LoraWeight]:
    """The LoRAs a call applies: those at weight 0 are left out, so that such a request is the
    model's own call exactly, and batches with it. (Applied at 0, PEFT still runs each adapted
    layer's LoRA branch and adds 0 times its output: the same sum on paper, yet on some
    machines' CPU kernels the pictures came out a level of 255 apart. A1111's weight 0 adds 0
    to the weights, which leaves the model's own: users compare against it.)"""
    return [lora for lora in request.loras if lora.weight != 0]


SWAPPED = ["latents", "prompt_embeds", "add_text_embeds"]  # the call's tensors a prompt schedule swaps


def lora_weights(request: ResolvedRequest) -> tuple[tuple[str, float], ...]:
    """What the LoRAs change in a call: its batch key's part and the prompt cache's."""
    return tuple((lora.id, lora.weight) for lora in acting_loras(request))


def guided(pipeline: Any, request: ResolvedRequest) -> bool:
    """Whether the call runs classifier-free guidance, as diffusers decides it."""
    return request.guidance_scale > 1 and pipeline.unet.config.time_cond_proj_dim is None


def image_prompt_arguments(prepared: PreparedRequest, models: list[ImagePromptModel], guided: bool) -> dict:
    """The IP-Adapters' image embeddings, one per adapter, of the pictures every request of the
    call brings (`Engine.batch_key`)."""
    pictures = prepared.image_prompts
    return {"ip_adapter_image_embeds": [embeddings(m, picture, guided) for m, picture in zip(models, pictures)]}


class Denoiser:
    def __init__(
        self,
        models: ModelManager,
        prompt_reader: Callable[[ModelSource], PromptReader],
        oom_seam: OutOfMemorySeam | None = None,
        tiling: Tiling = Tiling(),
    ):
        self.models = models
        self.prompt_reader = prompt_reader
        self.oom_seam = oom_seam
        self.tiling = tiling  # how a hires fix's upscale model cuts the first pass's images

    def __call__(self, batch: Batch, mode: str, attempt: int) -> tuple[list[list[Image.Image] | BackendError], Timings]:
        """One pipeline call for the batch (two with a hires fix or a refiner, which run alone);
        returns each request's images (or the `Cancelled` that dropped it) and the call's timings
        (load, LoRA load, inference). A device out-of-memory error comes out as `OutOfMemory`,
        with the call's memory freed. Every image has its own prompt row and CPU generator, so a
        request's pixels do not depend on what it shares the call with."""
        members = [prepared for prepared, _ in batch]
        first = members[0]
        request, source = first.request, first.source
        task = "txt2img" if first.init_image is None else "img2img" if first.mask is None else "inpaint"
        hires = request.hires_fix if task == "txt2img" else None
        progress = BatchProgress(batch)
        width, height = first.output_size
        # 1. Hold the models: the base, its ControlNets, its IP-Adapters.
        adapter_ids = [unit.id for unit in request.ip_adapters]
        with (
            self.models.use(source.id, mode, width * height) as (pipelines, load_s),
            self.models.use_side_models([unit.id for unit in request.controlnets]) as (controlnets, control_load_s),
            self.models.use_side_models(adapter_ids) as (image_prompt_models, adapter_load_s),
        ):
            # 2. Apply the LoRAs (before encoding: those that touch the text encoders change the
            # conditioning), and install the IP-Adapters in the UNet (or take out the last call's).
            lora_load_s = self.models.apply_loras(source.id, pipelines, acting_loras(request))
            self.models.out_of_memory_as_error(
                lambda: install(
                    pipelines, list(zip(adapter_ids, image_prompt_models)), [u.scale for u in request.ip_adapters]
                ),
                "out of memory installing the IP-Adapters",
            )
            pipeline = pipeline_for(pipelines, task, controlnets, pag=request.pag_scale > 0)
            pipeline.scheduler = pipelines.new_scheduler(request.scheduler, source.defaults.timestep_spacing)

            # 3. The call's arguments: those of every call, the prompts' conditioning (with prompt
            # editing, one per run of steps, swapped between steps), the task's own.
            def encode(reads: list[ReadPrompts]) -> dict[str, Any]:
                embeddings = self.prompt_reader(source).embeddings
                weights = lora_weights(request)
                return conditioning(pipeline, reads, pipelines.encoded_prompts, weights, embeddings, request.clip_skip)

            scheduled = self.models.out_of_memory_as_error(
                lambda: (
                    ConditioningSchedule(first.prompts, request.n, guided(pipeline, request), encode)
                    if first.prompts.schedule  # (such a request runs alone: batch_key)
                    else None
                ),
                "out of memory",
            )
            arguments = {
                **step_arguments(request.scheduler, request.steps),
                "guidance_scale": request.guidance_scale,
                **guidance_arguments(request),
                "generator": generators(members),
                "callback_on_step_end": self._step_callback(
                    attempt, progress, 0, self._second_pass_steps(first), scheduled.swap if scheduled else None
                ),
                **({"callback_on_step_end_tensor_inputs": SWAPPED} if scheduled else {}),
                **({"eta": request.eta} if request.eta is not None else {}),
                **self.models.out_of_memory_as_error(
                    lambda: encode(per_image(members, lambda prepared: prepared.prompts)), "out of memory"
                ),
                **(control_arguments(first, task) if controlnets else {}),
                **(
                    self.models.out_of_memory_as_error(
                        lambda: image_prompt_arguments(first, image_prompt_models, guided(pipeline, request)),
                        "out of memory",
                    )
                    if image_prompt_models
                    else {}
                ),
                **TASK_ARGUMENTS[task](members),
            }
            if request.refiner is not None:  # the base stops at switch_at and hands over its latents
                arguments.update(denoising_end=request.refiner.switch_at, output_type="latent")
            # 4. The first pass (FreeU on the base's UNet through both passes, when asked).
            started, refiner_load_s = time.perf_counter(), 0.0
            with freeu_applied(pipeline.unet, request.freeu):
                pictures = self.models.out_of_memory_as_error(lambda: pipeline(**arguments).images, "out of memory")
                # 5. The second pass, if any: the refiner's, or the hires fix's.
                if first.refiner is not None:
                    pictures, refiner_load_s = self._refine(
                        first,
                        pictures,
                        {**arguments, "generator": generators(members)},
                        mode,
                        attempt,
                        progress,
                        pipeline.num_timesteps,
                    )
                elif hires is not None:
                    second = pipeline_for(pipelines, "img2img", controlnets, pag=request.pag_scale > 0)
                    second.scheduler = pipelines.new_scheduler(request.scheduler, source.defaults.timestep_spacing)
                    pictures = self._hires_pass(
                        first, second, pictures, arguments, attempt, progress, pipeline.num_timesteps
                    )
            # 6. Inpainting: the repainted area pasted onto the input (the crop path pastes back by itself).
            if first.mask is not None and not request.masked_area_only:
                pictures = [
                    pipeline.image_processor.apply_overlay(first.mask, first.init_image, picture)
                    for picture in pictures
                ]
            # 7. Each request's own images. (A refiner loaded on the way counts as load time, not inference.)
            timings = Timings(
                load_s=load_s + control_load_s + adapter_load_s + refiner_load_s,
                lora_load_s=lora_load_s,
                inference_s=time.perf_counter() - started - refiner_load_s,
                encode_s=0.0,
            )
            return progress.split(pictures), timings

    @staticmethod
    def _second_pass_steps(prepared: PreparedRequest) -> int:
        """The steps planned after the first pass: the hires fix's, or the refiner's share."""
        request = prepared.request
        if request.refiner is not None:
            return prepared.total_steps - round(prepared.total_steps * request.refiner.switch_at)
        hires = request.hires_fix if prepared.init_image is None else None
        return int(hires.steps * hires.strength) if hires else 0

    def _hires_pass(
        self,
        prepared: PreparedRequest,
        pipeline: Any,
        pictures: Any,
        arguments: dict[str, Any],
        attempt: int,
        progress: BatchProgress,
        steps_run: int,
    ) -> list[Image.Image]:
        """The hires fix's second pass: the first pass's latents (or images) upscaled, repainted
        as img2img. (An interrupt in the first pass also ends this one after its first step.)"""
        request, hires = prepared.request, prepared.request.hires_fix
        assert hires is not None  # (the pass of a hires fix)
        width, height = prepared.output_size
        upscaled: torch.Tensor | list[Image.Image]
        if hires.upscaler == "latent":
            upscaled = torch.nn.functional.interpolate(pictures, size=(height // 8, width // 8), mode="bilinear")
        elif hires.upscaler == "lanczos":
            upscaled = [picture.resize((width, height), Image.Resampling.LANCZOS) for picture in pictures]
        else:  # (its tiles count as steps between the passes)
            upscaled, tiles = self._upscale_with_model(
                hires.upscaler, pictures, (width, height), progress, steps_run, self._second_pass_steps(prepared)
            )
            steps_run += tiles
        arguments = {
            **arguments,
            **step_arguments(request.scheduler, hires.steps),
            **(control_arguments(prepared, "img2img") if request.controlnets else {}),
            "image": upscaled,
            "strength": hires.strength,
            "output_type": "pil",
            "generator": generators([prepared]),
            "callback_on_step_end": self._step_callback(attempt, progress, steps_run, 0),
        }
        for first_pass_only in ("width", "height"):
            arguments.pop(first_pass_only)
        return self.models.out_of_memory_as_error(lambda: pipeline(**arguments).images, "out of memory")

    def _upscale_with_model(
        self,
        upscaler: str,
        pictures: list[Image.Image],
        size: tuple[int, int],
        progress: BatchProgress,
        steps_run: int,
        steps_after: int,
    ) -> tuple[list[Image.Image], int]:
        """The first pass's images through an upscale model; returns them and the tiles run.
        Each tile reads as a step after the `steps_run` of the first pass (with `steps_after`
        still to come), so the request sees progress and a cancel lands between two tiles."""
        tiles = [0]

        def on_tile(index: int) -> Callable[[int, int], None]:
            def count(done: int, per_picture: int) -> None:
                tiles[0] = len(pictures) * per_picture
                progress.step(steps_run + index * per_picture + done, steps_run + tiles[0] + steps_after, None)

            return count

        with self.models.use_side_models([upscaler]) as ((model,), _):
            upscaled = self.models.out_of_memory_as_error(
                lambda: [upscale(model, picture, size, self.tiling, on_tile(i)) for i, picture in enumerate(pictures)],
                f"out of memory upscaling with {upscaler} (a smaller SDXL_UPSCALE_TILE needs less)",
            )
        return upscaled, tiles[0]

    def _refine(
        self,
        prepared: PreparedRequest,
        latents: torch.Tensor,
        arguments: dict[str, Any],
        mode: str,
        attempt: int,
        progress: BatchProgress,
        steps_run: int,
    ) -> tuple[list[Image.Image], float]:
        """The refiner's part: the base's latents denoised from `switch_at` on (diffusers'
        ensemble of experts: no decoding in between), with `arguments` as the base ran (fresh
        generators in them); returns the images and the refiner's load seconds."""
        request, refiner, prompts = prepared.request, prepared.refiner, prepared.refiner_prompts
        assert request.refiner is not None and refiner is not None and prompts is not None  # (the refiner's pass)
        width, height = prepared.output_size
        with self.models.use(refiner.id, mode, width * height) as (pipelines, load_s):
            pipeline = pipelines.img2img
            pipeline.scheduler = pipelines.new_scheduler(request.scheduler, refiner.defaults.timestep_spacing)
            refined = self.models.out_of_memory_as_error(
                lambda: conditioning(
                    pipeline,
                    [prompts] * request.n,
                    pipelines.encoded_prompts,
                    embeddings=self.prompt_reader(refiner).embeddings,
                    clip_skip=request.clip_skip,
                ),
                "out of memory",
            )
            arguments = {
                **arguments,
                "image": latents,
                "denoising_start": request.refiner.switch_at,
                "output_type": "pil",
                **refined,
                "callback_on_step_end": self._step_callback(attempt, progress, steps_run, 0),
            }
            for base_only in BASE_ONLY_ARGUMENTS:
                arguments.pop(base_only, None)
            pictures = self.models.out_of_memory_as_error(lambda: pipeline(**arguments).images, "out of memory")
        return pictures, load_s

    def _step_callback(
        self,
        attempt: int,
        progress: BatchProgress,
        offset: int,
        after: int,
        swap: Callable[[int, dict], None] | None = None,
    ) -> Callable:
        """Reports the steps of one pipeline call, counted on from `offset` steps run before it,
        with `after` more planned (a hires fix's two passes read as one run); `swap` puts the
        next step's conditioning in place (prompt editing)."""
        seam = self.oom_seam

        def on_step_end(pipeline: Any, step: int, timestep: Any, tensors: dict) -> dict:
            if seam is not None and attempt < seam.attempts and step + 1 >= seam.step:
                raise torch.OutOfMemoryError("CUDA out of memory (SDXL_TEST_FAULT_OOM test seam)")
            total = offset + pipeline.num_timesteps + after
            if progress.step(offset + step + 1, total, tensors.get("latents")):
                pipeline._interrupt = True  # diffusers' documented way: skip the remaining steps, then decode
            if swap is not None:
                swap(step + 1, tensors)
            return tensors

        return on_step_end
