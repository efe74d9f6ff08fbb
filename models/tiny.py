"""Build `tiny-sdxl`: the SDXL architecture with tiny random weights.

It keeps what the serving code depends on: two CLIP text encoders whose hidden states are
concatenated, `text_time` added conditioning, a 4-channel latent space and a VAE with scale
factor 8, so latents, batches and image sizes have the shapes of the real model. Everything
else is made small: attention only at the lowest UNet resolution and none in the VAE, so a
1024x1024 image takes seconds on a CPU. The weights are random (seeded), so it draws noise.
A second VAE of the same architecture stands in for a replacement VAE in tests.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TEXT_HIDDEN = 16
TEXT_PROJECTION = 16
TIME_EMBED = 8
SEED = 0


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte-to-character table (from the GPT-2 BPE), so any text tokenizes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
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


def build_tiny_sdxl() -> StableDiffusionXLPipeline:
    """The tiny pipeline, identical for every call (seeded)."""
    torch.manual_seed(SEED)
    tokenizer = make_tokenizer()
    text_config = _text_config(len(tokenizer))
    text_encoder = CLIPTextModel(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    unet = UNet2DConditionModel(
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
        cross_attention_dim=2 * TEXT_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=TEXT_PROJECTION + 6 * TIME_EMBED,
    )
    vae = build_tiny_vae()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
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

