"""The MCP tools as a client reads them: each tool's arguments (made from the native request
models, so a field means the same, with the same description, limits and defaults, as in
`POST /v1/txt2img`), its structured result, and the listing `tools/list` answers."""

from __future__ import annotations

from typing import Any

import mcp_types as types
from pydantic import BaseModel, ConfigDict, Field, create_model

from backends.sdxl_backend.jobs import JobStatus
from backends.sdxl_backend.protocol import GenerationRequest, TextToImageRequest
from backends.sdxl_backend.upscale_protocol import UpscaleRequest

# The native fields an agent sets; the rest (hires fix, ControlNets, memory modes...) stay the
# HTTP API's, where a person tunes them.
GENERATION_FIELDS = (
    "prompt",
    "negative_prompt",
    "model",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "seed",
    "n",
    "scheduler",
    "clip_skip",
    "guidance_rescale",
    "pag_scale",
    "freeu",
    "loras",
    "priority",
)
WAIT = Field(
    True,
    description="Wait for the images, with progress notifications; false answers at once with the job "
    "(queued), to follow with get_job.",
)
IMAGE_REFERENCE = "a link this server handed out (.../v1/images/files/...), or the image in base64 (or a data URL)"


def arguments(name: str, source: type[BaseModel], fields: tuple[str, ...], **more: Any) -> type[BaseModel]:
    """A tool's arguments: `fields` of a native request model, as they are there, and `more`."""
    taken: dict[str, Any] = {
        field: (source.model_fields[field].annotation, source.model_fields[field]) for field in fields
    }
    return create_model(name, __config__=ConfigDict(extra="forbid"), **taken, **more)


GenerateImage = arguments("GenerateImage", TextToImageRequest, GENERATION_FIELDS, wait=(bool, WAIT))
EditImage = arguments(
    "EditImage",
    GenerationRequest,
    (*GENERATION_FIELDS, "strength"),
    image=(str, Field(description=f"The picture to change: {IMAGE_REFERENCE}.")),
    mask=(
        str | None,
        Field(None, description=f"Inpainting: where to repaint (white repaints, black keeps): {IMAGE_REFERENCE}."),
    ),
    wait=(bool, WAIT),
)

UpscaleImage = arguments(
    "UpscaleImage",
    UpscaleRequest,
    ("upscaler", "scale", "width", "height"),
    image=(str, Field(description=f"The picture to make larger: {IMAGE_REFERENCE}.")),
)


class JobId(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str = Field(description="A job's id, as generate_image or edit_image answered it.")


class NoArguments(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolImage(BaseModel):
    url: str = Field(description="The image, served from this server for a while (SDXL_IMAGE_URL_TTL_SECONDS).")
    seed: int
    width: int
    height: int
    media_type: str


class ToolJob(BaseModel):
    """A job as the tools show it: its state, and once it succeeded, links to its images."""

    job_id: str
    status: JobStatus
    queue_position: int = Field(description="1 for the next job to run; 0 when not waiting.")
    step: int
    total_steps: int
    model: str | None = Field(None, description="The model that served it, once it succeeded.")
    images: list[ToolImage] = Field([], description="Once it succeeded.")
    parameters: dict[str, Any] | None = Field(None, description="The request as it ran, every default filled in.")
    error: str | None = Field(None, description="Why it failed or was cancelled.")


class ToolUpscale(BaseModel):
    """An upscaled image: a link to it, its size, and what made it."""

    url: str = Field(description="The image, served from this server for a while (SDXL_IMAGE_URL_TTL_SECONDS).")
    width: int
    height: int
    media_type: str
    upscaler: str
    passes: int
    tiles: int


class Listing(BaseModel):
    data: list[dict[str, Any]]


# Each tool by name: what `tools/list` shows of it, and the model its arguments are read with.
TOOLS: dict[str, tuple[types.Tool, type[BaseModel]]] = {}


def define(
    name: str, title: str, description: str, takes: type[BaseModel], answers: type[BaseModel], **hints: bool
) -> None:
    TOOLS[name] = (
        types.Tool(
            name=name,
            title=title,
            description=description,
            input_schema=takes.model_json_schema(),
            output_schema=answers.model_json_schema(),
            annotations=types.ToolAnnotations(title=title, open_world_hint=False, **hints),
        ),
        takes,
    )


define(
    "generate_image",
    "Generate an image",
    "Draw an image from a text prompt with Stable Diffusion XL. Answers links to the images (PNG by "
    "default), their seeds and the parameters used, and a small preview of each.",
    GenerateImage,
    ToolJob,
    read_only_hint=False,
    destructive_hint=False,
)
define(
    "edit_image",
    "Edit an image",
    "Repaint an image after a prompt (image to image); with a mask, only the masked part (inpainting). "
    "`strength` is how much changes. Answers as generate_image.",
    EditImage,
    ToolJob,
    read_only_hint=False,
    destructive_hint=False,
)
define(
    "get_job",
    "Get a job",
    "A job's state (queued, running, succeeded, failed, cancelled), its progress, and its images once it succeeded.",
    JobId,
    ToolJob,
    read_only_hint=True,
)
define(
    "cancel_job",
    "Cancel a job",
    "Cancel a job: a queued one never starts, a running one stops at its next step.",
    JobId,
    ToolJob,
    read_only_hint=False,
    destructive_hint=True,
    idempotent_hint=True,
)
define(
    "list_models",
    "List the models",
    "The models this server serves (ids for `model`): which is the default, which are loaded now.",
    NoArguments,
    Listing,
    read_only_hint=True,
)
define(
    "list_loras",
    "List the LoRAs",
    "The LoRAs a generation can apply (`loras: [{id, weight}]`), with the models each fits.",
    NoArguments,
    Listing,
    read_only_hint=True,
)
define(
    "upscale_image",
    "Upscale an image",
    "Make an image larger with an upscale model (list_upscalers; 'lanczos' is a plain resize): by `scale`, "
    "or to `width` and/or `height`. Answers a link to the PNG and a small preview. Runs at once, not as a job.",
    UpscaleImage,
    ToolUpscale,
    read_only_hint=False,
    destructive_hint=False,
)
define(
    "list_upscalers",
    "List the upscalers",
    "The upscale models upscale_image can use (`upscaler`), each with its architecture and scale.",
    NoArguments,
    Listing,
    read_only_hint=True,
)
