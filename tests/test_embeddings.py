"""Textual-inversion embeddings: stored by the real import code, named in prompts, listed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from backends.sdxl_backend.device import select_placement
from backends.sdxl_backend.generation.engine import Engine
from backends.sdxl_backend.models.manager import ModelManager
from backends.sdxl_backend.models.records import ModelSource
from backends.sdxl_backend.prompts.embeddings import EMBEDDING_FILE, EmbeddingSet, EmbeddingSource
from backends.sdxl_backend.prompts.encoder import EncodedPrompts, conditioning
from backends.sdxl_backend.protocol import GenerationRequest
from models.catalog import defaults_for
from tests.conftest import pixels

NAME = "tiny-sdxl-embedding"


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_embedding):
    source = ModelSource("tiny-sdxl", Path(tiny_model.path), defaults_for("tiny-sdxl"))
    embedding = EmbeddingSource(NAME, Path(tiny_embedding.path), tiny_embedding.info.labels["fits"])
    return Engine(ModelManager([source], select_placement()), "tiny-sdxl", embeddings=EmbeddingSet([embedding]))


def image(engine: Engine, prompt: str, negative_prompt: str = "") -> bytes:
    request = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, seed=2, steps=4)
    return pixels(engine.generate(engine.prepare(request)).images[0].data)


def test_the_tiny_embedding_is_stored_as_an_sdxl_embedding_for_tiny_sdxl(tiny_embedding):
    assert tiny_embedding.info.labels["sdxl_kind"] == "embedding" and tiny_embedding.info.labels["fits"] == "16+16"
    vectors = load_file(Path(tiny_embedding.path) / EMBEDDING_FILE)
    assert {key: tuple(tensor.shape) for key, tensor in vectors.items()} == {"clip_l": (2, 16), "clip_g": (2, 16)}


def test_an_embedding_named_in_a_prompt_is_its_vectors_as_diffusers_loads_them(engine, tiny_model, tiny_embedding):
    from diffusers import StableDiffusionXLPipeline

    prompt = f"a {NAME} fox"
    prepared = engine.prepare(GenerationRequest(prompt=prompt, negative_prompt="blur"))
    assert prepared.prompts.prompt.tokens == len("afox") + 2  # the name is its two vectors
    with engine.models.use("tiny-sdxl", "high", 0) as (pipelines, _):
        ours = conditioning(
            pipelines.txt2img,
            [prepared.prompts],
            EncodedPrompts(),
            embeddings=engine.prompt_reader(prepared.source).embeddings,
        )
    reference = StableDiffusionXLPipeline.from_pretrained(tiny_model.path)  # (a pipeline of its own)
    vectors = load_file(Path(tiny_embedding.path) / EMBEDDING_FILE)
    reference.load_textual_inversion(
        vectors["clip_l"], token=NAME, text_encoder=reference.text_encoder, tokenizer=reference.tokenizer
    )
    reference.load_textual_inversion(
        vectors["clip_g"], token=NAME, text_encoder=reference.text_encoder_2, tokenizer=reference.tokenizer_2
    )
    theirs = reference.encode_prompt(prompt, device=torch.device("cpu"), negative_prompt="blur")
    for name, expected in zip(
        ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"), theirs
    ):
        assert torch.allclose(ours[name], expected, atol=1e-6), name


def test_bare_name_and_comfyui_syntax_agree_and_change_the_image(engine):
    named = image(engine, f"a {NAME} fox")
    assert named == image(engine, f"a embedding:{NAME} fox")
    assert named != image(engine, "a fox") and named != image(engine, f"a {NAME}s fox")  # (another word)
    assert image(engine, "a fox", negative_prompt=NAME) != image(engine, "a fox", negative_prompt="x")


def test_an_embedding_file_imports_from_a_path_and_one_of_other_widths_is_not_served(tmp_path, tiny_embedding):
    file = tmp_path / "style.safetensors"
    save_file({"clip_l": torch.randn(3, 768), "clip_g": torch.randn(3, 1280)}, str(file))
    run = subprocess.run(
        [sys.executable, "-m", "models", "import", "sdxl-style-embedding", "--from", str(file)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    from models.store import stored_model

    stored = stored_model("sdxl-style-embedding")
    assert (stored.info.labels["sdxl_kind"], stored.info.labels["fits"]) == ("embedding", "768+1280")
    embeddings = EmbeddingSet(
        [
            EmbeddingSource("sdxl-style-embedding", Path(stored.path), "768+1280"),
            EmbeddingSource(NAME, Path(tiny_embedding.path), "16+16"),
        ]
    )
    assert list(embeddings.for_model("16+16").embeddings) == [NAME]
    assert embeddings.for_model("16+16").offsets[NAME] == embeddings.offsets[NAME]  # the same rows everywhere


@pytest.mark.served
def test_served_embeddings_are_listed_natively_and_to_a1111_clients(side_models_server):
    import webuiapi

    server = side_models_server
    listed = httpx.get(f"{server.url}/v1/embeddings", timeout=300).json()["data"]
    fits = ["tiny-sdxl", "tiny-sdxl-refiner", "tiny-sdxl-vpred"]  # (the refiner through its OpenCLIP-G part)
    assert [(e["id"], e["fits"], e["vectors"]) for e in listed if e["id"] == NAME] == [(NAME, fits, 2)]
    assert "sdxl-style-embedding" not in [e["id"] for e in listed]  # made for SDXL's encoders, not tiny-sdxl's
    a1111 = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    assert a1111.get_embeddings()["loaded"][NAME] == {
        "step": None,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
        "shape": 16,
        "vectors": 2,
    }
    named = a1111.txt2img(prompt=f"a {NAME} fox", width=64, height=64, seed=2, steps=4)
    plain = a1111.txt2img(prompt="a fox", width=64, height=64, seed=2, steps=4)
    assert named.image.tobytes() != plain.image.tobytes()
