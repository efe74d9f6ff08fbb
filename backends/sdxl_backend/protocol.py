"""The one internal contract: every dialect builds a `GenerationRequest` and renders a
`GenerationResult`. Fields left `None` are filled from the model's defaults by the engine."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from backends.sdxl_backend.image_bytes import TINY_PNG, ImageBytes
from backends.sdxl_backend.models.modes import MEMORY_MODES
from backends.sdxl_backend.prompts.reader import (
    PromptStyle as PromptStyle,  # (re-exported: the dialects' wire models use it)
)
from backends.sdxl_backend.units import (
    MAX_CONTROLNETS,
    MAX_IP_ADAPTERS,
    MAX_LORAS,
    ControlNetUnit,
    IpAdapterUnit,
    LoraWeight,
)

OutputFormat = Literal["png", "jpeg", "webp"]
VramMode = Literal[MEMORY_MODES]  # type: ignore[valid-type]
Priority = Literal["high", "normal", "low"]
MaskedContent = Literal["original", "fill"]
MAX_SEED = 2**32 - 1

MAX_CLIP_SKIP = 12  # CLIP-L's layers, the fewer of SDXL's two encoders (A1111's slider goes as far)


class ModelDefaults(BaseModel):
    """What a model uses when a request leaves a field out (the catalog's per-model settings)."""

    model_config = ConfigDict(extra="forbid")

    width: int = 1024
    height: int = 1024
    steps: int = 30
    guidance_scale: float = 6.0
    scheduler: str = "euler"
    timestep_spacing: str | None = None
    clip_skip: int = Field(2, ge=1, le=MAX_CLIP_SKIP)  # 2: the penultimate layer, what SDXL was trained on
    guidance_rescale: float = Field(0.0, ge=0, le=1)  # v-prediction models with zero-terminal SNR ask for 0.7


class SamplingProfile(BaseModel):
    """How a few-step LoRA (LCM, Lightning, TCD, Hyper-SD, DMD2) is sampled, from its catalog
    entry: it fills the scheduler, steps, guidance and eta a request leaves out, before the
    model's defaults do."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheduler: str
    steps: int = Field(ge=1)
    guidance_scale: float = Field(ge=0)
    eta: float | None = Field(None, ge=0, le=1)


class FreeU(BaseModel):
    """FreeU: the UNet's backbone features amplified and its skip features damped on the up
    path, which sharpens detail (the paper's SDXL values are the defaults)."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # (frozen: hashable, a part of the batch key)

    s1: float = Field(0.9, ge=0, le=3, description="Skip features of the first up stage, scaled by this.")
    s2: float = Field(0.2, ge=0, le=3, description="Skip features of the second up stage, scaled by this.")
    b1: float = Field(1.3, ge=0, le=3, description="Backbone features of the first up stage, scaled by this.")
    b2: float = Field(1.4, ge=0, le=3, description="Backbone features of the second up stage, scaled by this.")


class HiresFix(BaseModel):
    """A second pass at a larger size (AUTOMATIC1111's hires fix): the first image is upscaled,
    then repainted as img2img, adding the detail one pass at that size would not."""

    model_config = ConfigDict(extra="forbid")

    scale: float = Field(2.0, ge=1, le=4, description="Upscale factor, when width and height are not given.")
    width: int | None = Field(None, description="Final width, a multiple of 8; default: width x scale.")
    height: int | None = Field(None, description="Final height, a multiple of 8; default: height x scale.")
    upscaler: str = Field(
        "latent",
        description="latent: upscale the latents; lanczos: the decoded image, resized; or a served upscale "
        "model (GET /v1/upscalers) run on the decoded image.",
    )
    strength: float = Field(0.55, gt=0, le=1, description="How much the second pass repaints.")
    steps: int | None = Field(
        None, ge=1, description="Second-pass steps (x strength are run); default: the request's steps."
    )


class Refiner(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("sdxl-refiner", description="A served refiner (an image-to-image-only model, GET /v1/models).")
    switch_at: float = Field(
        0.8, gt=0, lt=1, description="The part of the denoising the base model does; the refiner does the rest."
    )


class TextToImageRequest(BaseModel):
    """The fields of every generation. A field left out takes the model's default."""

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"example": {"prompt": "a lighthouse at dusk", "seed": 7}}
    )

    prompt: str = Field(min_length=1, description="What to draw.")
    negative_prompt: str = Field("", description="What to steer away from.")
    model: str | None = Field(None, description="A served model id or alias (GET /v1/models); default: the server's.")
    width: int | None = Field(
        None,
        description="Pixels, a multiple of 8 within the server's limits; default: the model's (img2img: the input's).",
    )
    height: int | None = Field(
        None,
        description="Pixels, a multiple of 8 within the server's limits; default: the model's (img2img: the input's).",
    )
    steps: int | None = Field(None, ge=1, description="Denoising steps; default: the model's.")
    guidance_scale: float | None = Field(
        None, ge=0, description="Classifier-free guidance (0 turns it off); default: the model's."
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Image i of the request uses seed + i; default: random."
    )
    n: int = Field(1, ge=1, description="Images in one batch.")
    scheduler: str | None = Field(None, description="A scheduler name (GET /v1/schedulers); default: the model's.")
    eta: float | None = Field(
        None, ge=0, le=1, description="DDIM's eta (0: deterministic, 1: full noise); only the ddim scheduler takes it."
    )
    clip_skip: int | None = Field(
        None,
        ge=1,
        le=MAX_CLIP_SKIP,
        description="The text encoders' layer the prompt is read from, counted from the last: 1 the last, 2 the "
        "one before (what SDXL was trained on), and so on; both encoders alike. Default: the model's (2).",
    )
    guidance_rescale: float | None = Field(
        None,
        ge=0,
        le=1,
        description="CFG rescale: the guided prediction's spread pulled back toward the conditional one's "
        "(0: off; 0.7 for v-prediction models with zero-terminal SNR). Default: the model's.",
    )
    freeu: FreeU | None = Field(None, description="FreeU on the UNet's up path (off when absent).")
    pag_scale: float = Field(
        0.0,
        ge=0,
        le=10,
        description="Perturbed-attention guidance: the prediction pushed away from one made with the UNet's "
        "middle self-attention blurred to identity (0: off; around 3 is usual).",
    )
    prompt_style: PromptStyle = Field(
        "a1111",
        description="Whose rule reads the prompts' brackets and weights: AUTOMATIC1111's, or ComfyUI's "
        "((word:1.2) moves a token from the empty prompt's encoding; [] and BREAK are text; embedding:name).",
    )
    output_format: OutputFormat = Field("png", description="Encoding of the images.")
    quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality.")
    vram_mode: VramMode | None = Field(None, description="Memory mode of this request; default: the server's.")
    priority: Priority = Field(
        "normal",
        description="Its place among the queued jobs: 'high' goes first (for the API keys the server lists), "
        "'low' after the rest. Within a priority, API keys take turns.",
    )
    hires_fix: HiresFix | None = Field(None, description="txt2img: a second, img2img pass at a larger size.")
    loras: list[LoraWeight] = Field(
        [], max_length=MAX_LORAS, description="LoRAs to apply, each with its weight; they must fit the model."
    )
    refiner: Refiner | None = Field(
        None, description="Hand the last part of the denoising to a refiner (not with hires_fix or a mask)."
    )
    controlnets: list[ControlNetUnit] = Field(
        [],
        max_length=MAX_CONTROLNETS,
        description="ControlNets guiding the generation, each with its control image; they must fit the model.",
    )
    ip_adapters: list[IpAdapterUnit] = Field(
        [],
        max_length=MAX_IP_ADAPTERS,
        description="Image prompts: IP-Adapters, each with the picture it reads; they must fit the model.",
    )


class Outpaint(BaseModel):
    """Outpainting: the input grown by these margins, the new area painted to match it."""

    model_config = ConfigDict(extra="forbid")

    left: int = Field(0, ge=0, multiple_of=8, description="Pixels added on the left (a multiple of 8).")
    right: int = Field(0, ge=0, multiple_of=8, description="Pixels added on the right.")
    top: int = Field(0, ge=0, multiple_of=8, description="Pixels added at the top.")
    bottom: int = Field(0, ge=0, multiple_of=8, description="Pixels added at the bottom.")
    fill: Literal["fill", "edge"] = Field(
        "fill",
        description="What the new area starts from: the colours around it spread outwards ('fill', A1111's), "
        "or the input's border pixels stretched ('edge').",
    )


class ImageToImageRequest(TextToImageRequest):
    model_config = ConfigDict(
        json_schema_extra={"example": {"prompt": "an oil painting", "strength": 0.6, "image": TINY_PNG}}
    )

    image: ImageBytes = Field(exclude=True, repr=False, description="The input image (PNG, JPEG, WebP...), base64.")
    strength: float = Field(
        0.75, gt=0, le=1, description="How much of the input to repaint; steps x strength must be at least 1."
    )
    mask: ImageBytes | None = Field(
        None,
        exclude=True,
        repr=False,
        description="Inpainting: where to repaint, white repaints and black keeps (resized to the output), base64.",
    )
    mask_blur: int = Field(4, ge=0, le=64, description="Inpainting: blur radius of the mask's edge, pixels.")
    mask_invert: bool = Field(False, description="Inpainting: black repaints and white keeps instead.")
    masked_content: MaskedContent = Field(
        "original",
        description="Inpainting: what the masked area starts from: the input there, or the colours around it ('fill').",
    )
    masked_area_only: bool = Field(
        False,
        description="Inpainting: repaint the mask's box (plus padding) at the full output resolution, then paste "
        "it back.",
    )
    masked_area_padding: int = Field(
        32, ge=0, le=1024, description="Inpainting with masked_area_only: pixels around the mask's box."
    )
    outpaint: Outpaint | None = Field(
        None,
        description="Grow the image: the margins given are painted (the model's inpainting path, its seam "
        "blurred by mask_blur); the output is the input's size plus them. Strength 1.0 unless given.",
    )


class GenerationRequest(ImageToImageRequest):
    """What the engine takes: a text-to-image request, or an image-to-image one with `image`
    (inpainting with a `mask` too)."""

    model_config = ConfigDict(json_schema_extra={"example": {"prompt": "a lighthouse at dusk", "seed": 7}})

    prompt: str = Field("", description="What to draw; empty only with an image (a variation of it).")
    # (the one place a subclass loosens a field: the engine's request covers both tasks)
    image: ImageBytes | None = Field(  # type: ignore[assignment]
        None, exclude=True, repr=False, description="img2img: the input image, base64."
    )


class ResolvedHiresFix(HiresFix):
    """A hires fix with its size and steps filled in (`validation.resolve`)."""

    width: int
    height: int
    steps: int


class ResolvedRequest(GenerationRequest):
    """What the engine runs: a request with every open field filled in (`validation.resolve`:
    the model's defaults, the input's size, a seed), so none of these is None any more."""

    model: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    scheduler: str
    clip_skip: int
    guidance_rescale: float
    hires_fix: ResolvedHiresFix | None = None
    # the LoRA whose sampling profile filled in fields the request left out (None: none did)
    sampling_profile: str | None = None


class GeneratedImage(BaseModel):
    data: bytes = Field(repr=False)
    media_type: str
    seed: int
    width: int
    height: int


class Timings(BaseModel):
    load_s: float
    inference_s: float
    encode_s: float
    lora_load_s: float = 0.0  # LoRAs loaded into the model for this request (0 when all were loaded already)


class PromptReading(BaseModel):
    """What the text encoders read of a prompt: its tokens (start, end and padding aside) and
    its chunks of 75 (a BREAK or a long prompt makes more)."""

    tokens: int
    chunks: int


class GenerationResult(BaseModel):
    model: str
    images: list[GeneratedImage]
    # The request as it ran: every default filled in, the base seed chosen (no input image).
    request: ResolvedRequest
    img2img: bool = False
    inpainting: bool = False
    timings: Timings
    vram_mode: str  # the memory mode that produced the images
    batch_images: int = 1  # images in the pipeline call that made these: more than n when batched with others
    out_of_memory_in: list[str] = []  # modes that ran out of memory first (recovered)
    prompt_reading: dict[str, PromptReading] = {}  # "prompt" and "negative_prompt"
    device: str | None = None  # the device that ran it ("cuda:1"; set by its device worker)

    @property
    def seeds(self) -> list[int]:
        return [image.seed for image in self.images]
