"""IP-Adapters: an image as a prompt ("in the style of this picture", "this face").

An IP-Adapter reads a picture through a CLIP image encoder and adds, to every cross-attention
layer of the UNet, a second attention over the picture's tokens beside the text's. It fits the
UNet architecture it was trained on (loras.py's signature). A stored IP-Adapter is a folder
with its weights (`ip-adapter.safetensors`, the layout of h94/IP-Adapter's files: `image_proj.*`
and `ip_adapter.N.to_k_ip/to_v_ip.*`) and its image encoder (`image_encoder/`, a
`CLIPVisionModelWithProjection`).

The model manager keeps loaded adapters beside the models (encoder and weights on the device);
a pipeline call with adapters installs them in the UNet (`install`), one without takes them out
again (the UNet's own attention processors back, exactly as they were), so a request without an
image prompt runs the model's own pixels. The picture's embedding is computed here, by the
adapter's own encoder (`embeddings`), and handed to the pipeline, which repeats it for every
image of the call: requests share a call only when they bring the same pictures (`digest`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (torch only where the device works: the store reads this module too)
    import torch
    from PIL import Image

    from backends.sdxl_backend.device import Placement
    from backends.sdxl_backend.models.pipelines import Pipelines

IP_ADAPTER_FILE = "ip-adapter.safetensors"
ENCODER_FOLDER = "image_encoder"


@dataclass(frozen=True)
class IpAdapterSource:
    id: str
    path: Path  # a folder holding IP_ADAPTER_FILE and ENCODER_FOLDER
    fits: str  # the UNet signature it was trained on


@dataclass
class ImagePromptModel:
    """A loaded IP-Adapter: its weights as diffusers' UNet loader takes them, and its encoder."""

    weights: dict[str, dict[str, torch.Tensor]] = field(repr=False)
    encoder: Any = field(repr=False)  # transformers' CLIPVisionModelWithProjection
    processor: Any = field(repr=False)  # its image processor (CLIP's resize, crop, normalize)
    # Plain IP-Adapters project the encoder's image embedding; "plus" ones read its tokens.
    reads_tokens: bool = False


def read_weights(file: Path, device: torch.device, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter file split the way diffusers' loader reads it (`load_ip_adapter`)."""
    from safetensors import safe_open

    weights: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    with safe_open(file, framework="pt") as tensors:
        for key in tensors.keys():
            part, _, name = key.partition(".")
            if part in weights:
                weights[part][name] = tensors.get_tensor(key).to(device, dtype)
    if not weights["image_proj"] or not weights["ip_adapter"]:
        raise ValueError(f"{file} is not an IP-Adapter (no image_proj.* and ip_adapter.* weights)")
    return weights


def is_ip_adapter(file: Path) -> bool:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as tensors:
        prefixes = {key.partition(".")[0] for key in tensors.keys()}
    return {"image_proj", "ip_adapter"} <= prefixes


def load_image_prompt_model(path: Path, placement: Placement) -> ImagePromptModel:
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    from backends.sdxl_backend.models.pipelines import loading_alone

    device, dtype = placement.device, placement.dtype

    # (Any: transformers' typing of PreTrainedModel.to wants the model as its first argument)
    encoder: Any = loading_alone(CLIPVisionModelWithProjection.from_pretrained)(
        path / ENCODER_FOLDER, dtype=dtype, use_safetensors=True, local_files_only=True
    )
    encoder = encoder.to(device)
    size = encoder.config.image_size
    weights = read_weights(path / IP_ADAPTER_FILE, device, dtype)
    return ImagePromptModel(
        weights,
        encoder.eval(),
        CLIPImageProcessorPil(size=size, crop_size=size),  # (the torchvision-free one: same pixels)
        reads_tokens="proj.weight" not in weights["image_proj"],
    )


def stored_bytes(path: Path, dtype: torch.dtype) -> int:
    """The adapter's and its encoder's weights once loaded in `dtype`, from the file headers."""
    from backends.sdxl_backend.models.pipelines import component_bytes

    return component_bytes(path, dtype) + component_bytes(path / ENCODER_FOLDER, dtype)


def install(pipelines: Pipelines, adapters: list[tuple[str, ImagePromptModel]], scales: list[float]) -> None:
    """Make exactly `adapters` act in the pipelines' UNet with `scales` (none: the UNet as it
    was loaded). Installed adapters stay until a call needs others, so a run of requests with
    the same image prompt model installs it once."""
    from backends.sdxl_backend.models.pipelines import loading_alone

    unet = pipelines.owner.unet
    wanted = tuple(adapter_id for adapter_id, _ in adapters)
    if wanted != pipelines.ip_adapters:
        if pipelines.ip_adapters != ():  # the UNet's own processors back, and no image projection
            unet.set_attn_processor(pipelines.plain_attention)
            unet.encoder_hid_proj = None
            unet.config.encoder_hid_dim_type = None
        # None until the new set is in: an install that fails half-way (out of memory, say) is
        # taken out by the next call, never left to act on requests without image prompts.
        pipelines.ip_adapters = None
        if adapters:
            pipelines.plain_attention = dict(unet.attn_processors)
            # (under the load lock: diffusers builds the new layers under accelerate's init_empty_weights)
            loading_alone(unet._load_ip_adapter_weights)([model.weights for _, model in adapters])
        pipelines.ip_adapters = wanted
    if adapters:
        pipelines.owner.set_ip_adapter_scale(scales)


def digest(picture: Image.Image) -> str:
    """What tells two pictures apart in a batch key."""
    import hashlib

    return hashlib.blake2b(picture.tobytes(), digest_size=8, person=picture.mode.encode()).hexdigest()


def embeddings(model: ImagePromptModel, picture: Image.Image, guided: bool) -> torch.Tensor:
    """`ip_adapter_image_embeds`' tensor for one adapter and its picture: the picture's row, after
    the unconditional one when the call is guided (classifier-free guidance), as diffusers
    orders them: zeros for plain adapters, the encoder's reading of a black image for those that
    read tokens. The pipeline repeats them for each image of the call."""
    import torch

    encoder = model.encoder
    pixels = model.processor([picture], return_tensors="pt").pixel_values.to(encoder.device, encoder.dtype)
    with torch.no_grad():
        if model.reads_tokens:
            rows = encoder(pixels, output_hidden_states=True).hidden_states[-2]
            empty = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        else:
            rows = encoder(pixels).image_embeds
            empty = torch.zeros_like(rows)
    rows, empty = rows[:, None], empty[:, None]  # (1, pictures per image, ...)
    return torch.cat([empty, rows]) if guided else rows
