"""Each speed setting (fast_paths.py) and the replacement VAE on the CPU, through the real
loader and engine: the setting is in effect on the loaded modules, and the images are those of
the plain model within what the setting's arithmetic changes. bench/gpu_sdxl.py times them."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from backends.sdxl_backend.device import select_placement
from backends.sdxl_backend.generation.engine import Engine
from backends.sdxl_backend.models.fast_paths import FastPaths
from backends.sdxl_backend.models.manager import ModelManager
from backends.sdxl_backend.models.records import ModelSource
from backends.sdxl_backend.protocol import GenerationRequest
from models.catalog import defaults_for


def engine_with(tiny_model, fast: FastPaths = FastPaths(), vae: Path | None = None) -> Engine:
    source = ModelSource("tiny-sdxl", Path(tiny_model.path), defaults_for("tiny-sdxl"))
    return Engine(ModelManager([source], select_placement(), fast_paths=fast, vae=vae), "tiny-sdxl")


def generate(engine: Engine) -> list[bytes]:
    request = GenerationRequest(prompt="a lighthouse at dusk", seed=7, n=2, steps=3)
    return [image.data for image in engine.generate(engine.prepare(request)).images]


def unet_and_vae(engine: Engine):
    with engine.models.use("tiny-sdxl", "high", 64 * 64) as (pipelines, _):
        return pipelines.owner.unet, pipelines.owner.vae


def max_difference(a: list[bytes], b: list[bytes]) -> int:
    def values(data: bytes) -> bytes:
        return Image.open(io.BytesIO(data)).convert("RGB").tobytes()

    return max(abs(x - y) for first, second in zip(a, b) for x, y in zip(values(first), values(second)))


@pytest.fixture(scope="module")
def plain(tiny_model) -> list[bytes]:
    return generate(engine_with(tiny_model))


def test_eager_attention_runs_plain_processors_and_draws_the_same_images(tiny_model, plain):
    engine = engine_with(tiny_model, FastPaths(attention="eager"))
    images = generate(engine)
    unet, _ = unet_and_vae(engine)
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor"}
    assert max_difference(images, plain) <= 2


def test_fused_qkv_projections_are_in_place_and_draw_the_same_images(tiny_model, plain):
    engine = engine_with(tiny_model, FastPaths(fuse_qkv=True))
    images = generate(engine)
    unet, _ = unet_and_vae(engine)
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    assert any(hasattr(module, "to_qkv") for module in unet.modules())
    assert max_difference(images, plain) <= 2


def test_channels_last_lays_out_the_convolutions_and_draws_the_same_images(tiny_model, plain):
    engine = engine_with(tiny_model, FastPaths(channels_last=True))
    images = generate(engine)
    unet, vae = unet_and_vae(engine)
    for module in (unet.conv_in, vae.decoder.conv_in):
        assert module.weight.is_contiguous(memory_format=torch.channels_last)
        assert not module.weight.is_contiguous()
    assert max_difference(images, plain) <= 2


@pytest.mark.parametrize("quantization", ["int8", "fp8"])
def test_quantized_unet_holds_quantized_weights_and_draws_nearly_the_same_images(tiny_model, plain, quantization):
    engine = engine_with(tiny_model, FastPaths(quantize=quantization))
    images = generate(engine)
    unet, _ = unet_and_vae(engine)
    weight = unet.down_blocks[2].attentions[0].transformer_blocks[0].attn1.to_q.weight
    assert type(weight).__module__.startswith("torchao"), type(weight)
    assert images != plain  # quantized arithmetic: not the same bytes ...
    assert max_difference(images, plain) <= 24  # ... but the same picture, off by a few levels


@pytest.mark.long
def test_compiled_unet_and_decoder_draw_the_same_images(tiny_model, plain):
    """torch.compile with inductor on the CPU (gcc builds its kernels): the slowest test of
    the suite, a minute or more, once."""
    torch._dynamo.reset()
    engine = engine_with(tiny_model, FastPaths(compile=True))
    images = generate(engine)
    unet, vae = unet_and_vae(engine)
    assert unet._compiled_call_impl is not None and vae.decoder._compiled_call_impl is not None
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames >= 2  # at least the UNet's and the decoder's graphs were compiled
    assert max_difference(images, plain) <= 2


def test_a_stored_vae_replaces_the_models_own(tiny_model, plain):
    from models.store import import_tiny, stored_model

    stored = stored_model("tiny-sdxl-vae", "vae") or import_tiny("tiny-sdxl-vae")
    engine = engine_with(tiny_model, vae=Path(stored.path))
    images = generate(engine)
    _, vae = unet_and_vae(engine)
    stored_weights = load_file(Path(stored.path) / "diffusion_pytorch_model.safetensors")
    assert torch.equal(vae.decoder.conv_out.weight, stored_weights["decoder.conv_out.weight"])
    assert images != plain  # same latents, another decoder


@pytest.mark.served
def test_a_server_with_the_speed_settings_and_a_replacement_vae_serves_and_says_so(serve, tiny_model):
    """Compile is left out here: its in-process test above covers it, at minutes a compile."""
    import httpx

    from models.store import import_tiny, stored_model

    stored_model("tiny-sdxl-vae", "vae") or import_tiny("tiny-sdxl-vae")
    server = serve(
        "fast",
        {
            "SDXL_MODELS": "tiny-sdxl",
            "SDXL_VAE": "tiny-sdxl-vae",
            "SDXL_FUSE_QKV": "1",
            "SDXL_CHANNELS_LAST": "1",
            "SDXL_QUANTIZE": "int8",
        },
    )
    status = httpx.get(f"{server.url}/v1/system/status", timeout=300).json()
    assert status["vae"] == "tiny-sdxl-vae"
    assert status["fast_paths"] == {
        "attention": "sdpa",
        "fuse_qkv": True,
        "channels_last": True,
        "quantize": "int8",
        "compile": False,
    }
    models = httpx.get(f"{server.url}/v1/models", timeout=300).json()
    assert "tiny-sdxl-vae" not in str(models)  # a component, never a model to ask for
    answer = httpx.post(f"{server.url}/v1/txt2img", json={"prompt": "a lighthouse", "seed": 7}, timeout=300)
    assert answer.status_code == 200 and answer.json()["images"]
    assert "VAE tiny-sdxl-vae; attention sdpa, fuse_qkv, channels_last, quantize int8" in server.log()


@pytest.mark.served
def test_a_vae_that_is_not_stored_stops_the_start_naming_sdxl_vae(tiny_model, tmp_path):
    from tests.served import start_that_fails

    server = start_that_fails({"SDXL_MODELS": "tiny-sdxl", "SDXL_VAE": "no-such-vae"}, tmp_path / "server.log")
    assert server.process.returncode != 0
    assert "SDXL_VAE=no-such-vae is not a VAE in the model store" in server.log()
