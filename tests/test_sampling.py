"""Sampling as today's SDXL models need it, each setting against plain diffusers called with the
same setting, seed and model (the same computation, so the same pixels): CFG rescale, FreeU,
a v-prediction model with zero-terminal SNR, the TCD solver. Each one also changes the picture."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, TCDScheduler
from PIL import Image

from backends.sdxl_backend.device import select_placement
from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.generation.engine import Engine
from backends.sdxl_backend.models.manager import ModelManager
from backends.sdxl_backend.models.records import ModelSource
from backends.sdxl_backend.protocol import FreeU, GenerationRequest
from models.catalog import defaults_for

PLAIN = {"prompt": "a lighthouse", "seed": 4, "steps": 4, "guidance_scale": 5.0, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_vpred) -> Engine:
    sources = [
        ModelSource(m.info.labels["sdxl_id"], Path(m.path), defaults_for(m.info.labels["sdxl_id"]))
        for m in (tiny_model, tiny_vpred)
    ]
    return Engine(ModelManager(sources, select_placement()), "tiny-sdxl")


def served(engine: Engine, **fields) -> np.ndarray:
    result = engine.generate(engine.prepare(GenerationRequest(**{**PLAIN, **fields})))
    return np.asarray(Image.open(io.BytesIO(result.images[0].data)).convert("RGB"), dtype=np.int16)


def plain_diffusers(model, prepare=lambda pipeline: None, load=DiffusionPipeline.from_pretrained, **call) -> np.ndarray:
    """The stored pipeline as diffusers loads it, called the way its own docs call it."""
    pipeline = load(model.path, local_files_only=True)
    prepare(pipeline)
    arguments = {key: PLAIN[key] for key in ("prompt", "guidance_scale", "width", "height")}
    image = pipeline(
        **arguments,
        num_inference_steps=PLAIN["steps"],
        generator=torch.Generator("cpu").manual_seed(PLAIN["seed"]),
        **call,
    ).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def difference(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def test_cfg_rescale_is_diffusers_own_and_changes_the_picture(engine, tiny_model):
    rescaled = served(engine, guidance_rescale=0.7)
    assert difference(rescaled, plain_diffusers(tiny_model, guidance_rescale=0.7)) == 0
    assert difference(rescaled, served(engine)) > 1


def test_freeu_is_diffusers_own_and_is_off_again_for_the_next_request(engine, tiny_model):
    plain = served(engine)
    freeu = served(engine, freeu=FreeU())
    reference = plain_diffusers(tiny_model, lambda pipeline: pipeline.enable_freeu(s1=0.9, s2=0.2, b1=1.3, b2=1.4))
    assert difference(freeu, reference) == 0 and difference(freeu, plain) > 1
    assert difference(served(engine), plain) == 0  # (the switch did not stay on)


def test_a_v_prediction_model_samples_as_diffusers_configured_for_it(engine, tiny_vpred, tiny_model):
    source = engine.models.source("tiny-sdxl-vpred")
    assert (source.sampling.prediction_type, source.sampling.zero_snr) == ("v_prediction", True)
    vpred = served(engine, model="tiny-sdxl-vpred")  # (its catalog defaults: guidance_rescale 0.7)
    assert difference(vpred, plain_diffusers(tiny_vpred, guidance_rescale=0.7)) == 0
    assert difference(vpred, served(engine, guidance_rescale=0.7)) > 1  # the same weights read as epsilon
    with pytest.raises(InvalidRequest, match="cannot run model 'tiny-sdxl-vpred'") as refused:
        engine.prepare(GenerationRequest(**PLAIN, model="tiny-sdxl-vpred", scheduler="heun"))
    assert refused.value.param == "scheduler"


def test_tcd_with_its_eta_is_diffusers_own(engine, tiny_model):
    tcd = served(engine, scheduler="tcd", eta=0.3)

    def with_tcd(pipeline):
        pipeline.scheduler = TCDScheduler.from_config(pipeline.scheduler.config)

    assert difference(tcd, plain_diffusers(tiny_model, with_tcd, eta=0.3)) == 0
    assert difference(tcd, served(engine, scheduler="tcd", eta=0.9)) > 1
    with pytest.raises(InvalidRequest, match="only the ddim and tcd schedulers take eta"):
        engine.prepare(GenerationRequest(**PLAIN, eta=0.3))


def test_pag_is_diffusers_own_and_changes_the_picture_and_zero_is_off(engine, tiny_model):
    """diffusers' PAG pipeline as its docs load it (AutoPipeline with enable_pag), on the layers
    the server picks: SDXL's middle block; tiny-sdxl has none, so its first up block."""
    from diffusers import AutoPipelineForText2Image

    from backends.sdxl_backend.models.pipelines import pag_layers

    def pag_pipeline(path, **options):
        unet_only = AutoPipelineForText2Image.from_pretrained(path, **options).unet
        assert pag_layers(unet_only) == ["up_blocks.0"]
        return AutoPipelineForText2Image.from_pretrained(
            path, enable_pag=True, pag_applied_layers=pag_layers(unet_only), **options
        )

    guided = served(engine, pag_scale=3.0)
    assert difference(guided, plain_diffusers(tiny_model, load=pag_pipeline, pag_scale=3.0)) == 0
    assert difference(guided, served(engine)) > 1
    assert difference(served(engine, pag_scale=0.0), served(engine)) == 0
    hires = served(engine, pag_scale=3.0, hires_fix={"scale": 1.5, "steps": 2})  # (both passes guided)
    assert hires.shape == (96, 96, 3)


def test_pag_is_refused_by_name_with_what_it_cannot_run_beside(engine):
    from backends.sdxl_backend.image_bytes import TINY_PNG

    for other in (
        {"ip_adapters": [{"id": "any-adapter", "image": TINY_PNG}]},
        {"refiner": {"model": "tiny-sdxl"}},
        {"prompt": "a [lighthouse:tower:0.5]"},
    ):
        with pytest.raises(InvalidRequest) as refused:
            engine.prepare(GenerationRequest(**{**PLAIN, "pag_scale": 3.0, **other}))
        assert "pag_scale" in refused.value.message, refused.value.message


def test_requests_with_other_sampling_settings_never_share_a_call(engine):
    def key(**fields):
        return engine.batch_key(engine.prepare(GenerationRequest(**{**PLAIN, **fields})))

    assert (
        len({key(), key(guidance_rescale=0.7), key(freeu=FreeU()), key(freeu=FreeU(b1=1.1)), key(pag_scale=3.0)}) == 5
    )
    assert key(guidance_rescale=0.0) == key()


def test_cfg_rescale_with_a_controlnet_is_refused_by_name(engine):
    from backends.sdxl_backend.image_bytes import TINY_PNG

    unit = {"id": "any-controlnet", "image": TINY_PNG}
    with pytest.raises(InvalidRequest) as refused:
        engine.prepare(GenerationRequest(**PLAIN, guidance_rescale=0.5, controlnets=[unit]))
    assert refused.value.param == "guidance_rescale"
