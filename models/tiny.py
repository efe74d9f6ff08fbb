"""Build `tiny-sdxl`: the SDXL architecture with tiny random weights.

It keeps what the serving code depends on: two CLIP text encoders whose hidden states are
concatenated, `text_time` added conditioning, a 4-channel latent space and a VAE with scale
factor 8, so latents, batches and image sizes have the shapes of the real model. Everything
else is made small: attention only at the lowest UNet resolution and none in the VAE, so a
1024x1024 image takes seconds on a CPU. The weights are random (seeded), so it draws noise.
A second VAE, a LoRA, a ControlNet, an embedding and an IP-Adapter of the same architecture
stand in for those components in tests, and a tiny ESRGAN for the upscalers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    ControlNetUnionModel,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TEXT_HIDDEN = 16
TEXT_PROJECTION = 16
TIME_EMBED = 8
SEED = 0


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte-to-character table (from the GPT-2 BPE), so any text tokenizes."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def make_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges: every byte is a token. Made, not downloaded."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in sorted(_bytes_to_unicode().values()):
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=TEXT_PROJECTION,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )


def tiny_unet(cross_attention_dim: int, time_ids: int) -> UNet2DConditionModel:
    """SDXL's UNet layout, tiny; the base model conditions on both text encoders and 6 time
    ids, the refiner on the second encoder and 5 (its aesthetic score replaces the crop size)."""
    return UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=1,
        use_linear_projection=True,
        norm_num_groups=4,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=TEXT_PROJECTION + time_ids * TIME_EMBED,
    )


def tiny_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def build_tiny_sdxl() -> StableDiffusionXLPipeline:
    """The tiny pipeline, identical for every call (seeded)."""
    torch.manual_seed(SEED)
    tokenizer = make_tokenizer()
    text_config = _text_config(len(tokenizer))
    text_encoder = CLIPTextModel(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    unet = tiny_unet(2 * TEXT_HIDDEN, 6)
    return StableDiffusionXLPipeline(
        vae=build_tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=tiny_scheduler(),
    )


def build_tiny_vpred() -> StableDiffusionXLPipeline:
    """tiny-sdxl's weights as a v-prediction model trained with zero-terminal SNR (what
    NoobAI-XL's v-pred line is): its scheduler config says so, with the trailing timesteps such
    models are sampled on."""
    pipeline = build_tiny_sdxl()
    pipeline.scheduler = EulerDiscreteScheduler.from_config(
        pipeline.scheduler.config,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )
    return pipeline


def build_tiny_refiner() -> StableDiffusionXLImg2ImgPipeline:
    """A tiny refiner shaped as SDXL's: image-to-image only, the second text encoder alone,
    aesthetic-score conditioning."""
    torch.manual_seed(SEED + 3)
    tokenizer = make_tokenizer()
    return StableDiffusionXLImg2ImgPipeline(
        vae=build_tiny_vae(),
        text_encoder=None,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tokenizer))),
        tokenizer=None,
        tokenizer_2=tokenizer,
        unet=tiny_unet(TEXT_HIDDEN, 5),
        scheduler=tiny_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )


def build_tiny_vae(seed: int | None = None) -> AutoencoderKL:
    """The tiny pipeline's VAE architecture. With its own seed, a second VAE (tiny-sdxl-vae)
    that stands in for a replacement VAE such as the fp16-fix SDXL VAE."""
    if seed is not None:
        torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=1024,
        scaling_factor=0.13025,
        mid_block_add_attention=False,
        force_upcast=False,
    )


def save_tiny_lora(path: Path, seed: int = SEED + 2) -> None:
    """A LoRA for tiny-sdxl's UNet attention (rank 4), random in both factors so that it
    changes the images (a trained LoRA's second factor starts at zero); `seed` makes others."""
    from peft import LoraConfig, get_peft_model_state_dict

    unet = build_tiny_sdxl().unet
    torch.manual_seed(seed)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    StableDiffusionXLPipeline.save_lora_weights(
        path, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )


def save_tiny_embedding(path: Path, seed: int = SEED + 5) -> None:
    """A textual-inversion embedding for tiny-sdxl: two random vectors for each text encoder,
    in SDXL's file layout (`clip_l`, `clip_g`)."""
    from safetensors.torch import save_file

    from backends.sdxl_backend.prompts.embeddings import EMBEDDING_FILE

    generator = torch.Generator().manual_seed(seed)
    save_file(
        {key: torch.randn(2, TEXT_HIDDEN, generator=generator) for key in ("clip_l", "clip_g")},
        str(path / EMBEDDING_FILE),
    )


def build_tiny_controlnet(seed: int = SEED + 4) -> ControlNetModel:
    """A ControlNet made from tiny-sdxl's UNet, as diffusers makes one for training
    (`ControlNetModel.from_unet`: the encoder's weights copied), with random zero convolutions
    where training starts them at zero, so that it changes the images. (ControlNets need a
    middle block, which tiny-sdxl's UNet does without: a small one is added.)"""
    unet = build_tiny_sdxl().unet
    with_middle = UNet2DConditionModel.from_config({**unet.config, "mid_block_type": "UNetMidBlock2D"})
    with_middle.load_state_dict(unet.state_dict(), strict=False)
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(with_middle, conditioning_embedding_out_channels=(4, 8, 8, 16))
    with torch.no_grad():
        for zero_conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            zero_conv.weight.normal_(0.0, 0.5)
    return controlnet


def build_tiny_union_controlnet(seed: int = SEED + 8) -> ControlNetUnionModel:
    """A union ControlNet for tiny-sdxl (xinsir's ControlNet Union's architecture: one model,
    a task embedding row per control type, 8 as in its promax version): the tiny ControlNet's
    weights, and random ones where the union adds its own (the control-type embedding and the
    transformer that mixes the conditions)."""
    plain = build_tiny_controlnet()
    takes = set(inspect.signature(ControlNetUnionModel.__init__).parameters)
    config = {key: value for key, value in plain.config.items() if key in takes}
    width = config["block_out_channels"][0]
    torch.manual_seed(seed)
    union = ControlNetUnionModel(
        **config, num_control_type=8, num_trans_channel=width, num_trans_head=2, num_proj_channel=width
    )
    union.load_state_dict(plain.state_dict(), strict=False)
    return union


def save_tiny_ip_adapter(path: Path, seed: int = SEED + 6) -> None:
    """An IP-Adapter for tiny-sdxl, with its image encoder (a tiny CLIP vision model), in the
    layout of h94/IP-Adapter's files: the image projection (`image_proj.proj`: the encoder's
    embedding to 4 tokens of the UNet's text width, `image_proj.norm`) and per cross-attention
    layer, numbered as diffusers reads them (1, 3, 5...), the picture's key and value
    projections. Random, so that it changes the images."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from backends.sdxl_backend.models.ip_adapters import ENCODER_FOLDER, IP_ADAPTER_FILE

    unet = build_tiny_sdxl().unet
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            projection_dim=TEXT_PROJECTION,
        )
    )
    encoder.save_pretrained(path / ENCODER_FOLDER, safe_serialization=True)
    width = unet.config.cross_attention_dim
    weights = {
        "image_proj.proj.weight": torch.randn(4 * width, TEXT_PROJECTION) * 0.5,
        "image_proj.proj.bias": torch.randn(4 * width) * 0.1,
        "image_proj.norm.weight": torch.ones(width),
        "image_proj.norm.bias": torch.zeros(width),
    }
    cross_attention = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for index, name in enumerate(cross_attention):
        to_k = unet.get_submodule(name.removesuffix(".processor")).to_k
        for projection in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{2 * index + 1}.{projection}.weight"] = torch.randn_like(to_k.weight) * 0.5
    save_file(weights, str(path / IP_ADAPTER_FILE))


def save_tiny_upscaler(path: Path, seed: int = SEED + 7) -> None:
    """A 4x ESRGAN (RRDBNet, 8 features, one block: about 0.2 M weights), random, in the
    store's upscaler layout. spandrel reads it as it reads Real-ESRGAN's own files."""
    from spandrel import ModelLoader
    from spandrel.architectures.ESRGAN import ESRGAN

    from backends.sdxl_backend.models.upscalers import save_upscaler

    torch.manual_seed(seed)
    network = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=4)
    save_upscaler(ModelLoader().load_from_state_dict(network.state_dict()), path)


def tiny_recipe(model_id: str) -> tuple[str, Callable[[Path], None], dict[str, str]]:
    """How the store makes tiny model `model_id`: its kind, what writes its folder, its labels
    (a ControlNet's config holds the widths of the UNet it was made from)."""
    from backends.sdxl_backend.models.loras import unet_signature

    def saved(build: Callable[[], Any]) -> Callable[[Path], None]:
        return lambda path: build().save_pretrained(path, safe_serialization=True)

    if model_id == "tiny-sdxl":
        return "pipeline", saved(build_tiny_sdxl), {}
    if model_id == "tiny-sdxl-refiner":
        return "pipeline", saved(build_tiny_refiner), {}
    if model_id == "tiny-sdxl-vpred":
        return "pipeline", saved(build_tiny_vpred), {}
    if model_id == "tiny-sdxl-vae":
        return "vae", saved(lambda: build_tiny_vae(seed=SEED + 1)), {}
    if model_id in ("tiny-sdxl-controlnet", "tiny-sdxl-controlnet-union"):
        controlnet = build_tiny_controlnet() if model_id == "tiny-sdxl-controlnet" else build_tiny_union_controlnet()
        return "controlnet", saved(lambda: controlnet), {"fits": unet_signature(controlnet.config)}
    if model_id == "tiny-sdxl-embedding":
        return "embedding", save_tiny_embedding, {"fits": f"{TEXT_HIDDEN}+{TEXT_HIDDEN}"}
    if model_id == "tiny-upscaler":
        return "upscaler", save_tiny_upscaler, {}
    fits = {"fits": unet_signature(build_tiny_sdxl().unet.config)}
    if model_id == "tiny-sdxl-ip-adapter":
        return "ip-adapter", save_tiny_ip_adapter, fits
    if model_id == "tiny-sdxl-tcd-lora":
        return "lora", lambda path: save_tiny_lora(path, seed=SEED + 7), fits
    return "lora", save_tiny_lora, fits
