"""What SDXL reads of a prompt, through the real tiny pipeline: long prompts, A1111 emphasis,
BREAK, escapes, the plain syntax, batches. (tiny-sdxl's tokenizer is byte-level: one token a
character.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backends.sdxl_backend.device import select_placement
from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.generation.engine import Engine
from backends.sdxl_backend.models.manager import ModelManager
from backends.sdxl_backend.models.records import ModelSource
from backends.sdxl_backend.prompts.encoder import EncodedPrompts, conditioning
from backends.sdxl_backend.protocol import GenerationRequest
from models.catalog import defaults_for
from tests.conftest import pixels
from tests.test_backend import counting_calls, max_difference


def make_engine(tiny_model, syntax: str = "a1111") -> Engine:
    source = ModelSource("tiny-sdxl", Path(tiny_model.path), defaults_for("tiny-sdxl"))
    return Engine(ModelManager([source], select_placement()), "tiny-sdxl", prompt_syntax=syntax)


@pytest.fixture(scope="module")
def engine(tiny_model):
    return make_engine(tiny_model)


def image(engine: Engine, prompt: str, **fields) -> bytes:
    request = GenerationRequest(**{"prompt": prompt, "seed": 3, "steps": 4, "guidance_scale": 5.0, **fields})
    return engine.generate(engine.prepare(request)).images[0].data


def test_a_plain_short_prompt_is_encoded_as_diffusers_encodes_it(engine):
    prepared = engine.prepare(GenerationRequest(prompt="a red fox in the snow", negative_prompt="blurry"))
    with engine.models.use("tiny-sdxl", "high", 0) as (pipelines, _):
        ours = conditioning(pipelines.txt2img, [prepared.prompts], EncodedPrompts())
        theirs = pipelines.txt2img.encode_prompt(
            "a red fox in the snow", device=torch.device("cpu"), negative_prompt="blurry"
        )
    for name, expected in zip(
        ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"), theirs
    ):
        assert torch.equal(ours[name], expected), name


def test_a_word_after_the_77th_token_changes_the_pixels(engine):
    filler = "x" * 100
    red, blue = image(engine, f"{filler} red"), image(engine, f"{filler} blue")
    assert pixels(red) != pixels(blue)
    answer = engine.generate(engine.prepare(GenerationRequest(prompt=f"{filler} red", steps=2)))
    assert answer.prompt_reading["prompt"].model_dump() == {"tokens": 103, "chunks": 2}  # (a space is no token)


def test_weights_of_one_are_the_plain_text_and_other_weights_are_not(engine):
    plain = pixels(image(engine, "a fox"))
    assert pixels(image(engine, "(a fox:1.0)")) == plain
    for emphasised in ("(a fox:1.3)", "[a fox]", "a fox BREAK a hat", "(a fox)"):
        assert pixels(image(engine, emphasised)) != plain, emphasised
    assert max_difference(image(engine, "((fox))"), image(engine, "(fox:1.21)")) <= 1


def test_escaped_brackets_are_text(engine, tiny_model):
    plain_syntax = make_engine(tiny_model, "plain")
    escaped = pixels(image(engine, "\\(a fox\\)"))
    assert escaped == pixels(image(plain_syntax, "(a fox)"))  # the brackets read as brackets
    assert escaped != pixels(image(engine, "(a fox)")) and escaped != pixels(image(engine, "a fox"))


def test_the_negative_prompt_is_read_the_same_way(engine):
    plain = pixels(image(engine, "a fox", negative_prompt="blurry"))
    assert pixels(image(engine, "a fox", negative_prompt="(blurry:1.0)")) == plain
    assert pixels(image(engine, "a fox", negative_prompt="(blurry:1.4)")) != plain
    assert pixels(image(engine, "a fox", negative_prompt="y" * 100 + " blurry")) != plain  # long too


def test_requests_with_and_without_a_negative_prompt_share_a_call_and_get_their_own_pixels(engine, monkeypatch):
    requests = [
        GenerationRequest(prompt="a fox", seed=5, steps=4),
        GenerationRequest(prompt="a fox", negative_prompt="(blurry:1.2)", seed=5, steps=4),
    ]
    alone = [engine.generate(engine.prepare(request)) for request in requests]
    prepared = [engine.prepare(request) for request in requests]
    assert engine.batch_key(prepared[0]) == engine.batch_key(prepared[1])
    calls = counting_calls(engine, monkeypatch)
    together = engine.generate_batch([(p, None) for p in prepared])
    assert calls == [2]
    for one, batched in zip(alone, together):
        assert max_difference(one.images[0].data, batched.images[0].data) <= 3


def test_a_one_chunk_and_a_three_chunk_prompt_run_apart_each_as_alone(engine):
    short, long = (engine.prepare(GenerationRequest(prompt=text, seed=5, steps=4)) for text in ("a fox", "z" * 200))
    assert (short.prompts.chunk_count, long.prompts.chunk_count) == (1, 3)
    assert engine.batch_key(short) != engine.batch_key(long)  # (padding the short one would change what it reads)


def test_a_prompt_read_again_skips_the_text_encoders_and_gives_the_same_pixels(tiny_model):
    engine = make_engine(tiny_model)
    first = image(engine, "a lighthouse (at dusk:1.2)", negative_prompt="fog")
    with engine.models.use("tiny-sdxl", "high", 0) as (pipelines, _):
        calls = []
        hooks = [
            encoder.register_forward_hook(lambda *_: calls.append(1))
            for encoder in (pipelines.txt2img.text_encoder, pipelines.txt2img.text_encoder_2)
        ]
    again = image(engine, "a lighthouse (at dusk:1.2)", negative_prompt="fog")
    assert calls == [] and pixels(again) == pixels(first)
    image(engine, "a lighthouse (at dusk:1.3)", negative_prompt="fog")  # another weight: encoded (the prompt only)
    assert len(calls) == 2
    for hook in hooks:
        hook.remove()
    cache = EncodedPrompts(size=2)
    prompts = [engine.prepare(GenerationRequest(prompt=text)).prompts.prompt for text in ("a", "b", "c")]
    with engine.models.use("tiny-sdxl", "high", 0) as (pipelines, _):
        cache.encode(pipelines.txt2img, prompts, loras=())
        assert len(cache) == 2  # the least recently used went
        states, _ = cache.encode(pipelines.txt2img, prompts[:1] * 2, loras=(("some-lora", 0.8),))
    assert states.shape[0] == 2 and len(cache) == 2


def test_out_of_memory_while_encoding_is_recovered_like_any_other(tiny_model):
    """(A CUDA out-of-memory error cannot happen on the CPU: the text encoder's first call here
    raises the one torch raises, the stand-in for the GPU.)"""
    engine = make_engine(tiny_model)
    image(engine, "warm")
    with engine.models.use("tiny-sdxl", "high", 0) as (pipelines, _):
        raised = []

        def out_of_memory_once(*_):
            if not raised:
                raised.append(1)
                raise torch.OutOfMemoryError("CUDA out of memory (stand-in for a GPU)")

        hook = pipelines.txt2img.text_encoder.register_forward_pre_hook(out_of_memory_once)
    result = engine.generate(engine.prepare(GenerationRequest(prompt="a fox never encoded before", steps=2)))
    hook.remove()
    assert raised and result.out_of_memory_in == ["high"] and result.vram_mode == "balanced"


def test_clip_skip_reads_the_layer_it_counts_back_from_the_last_in_both_encoders(engine):
    """2 (the default) is the penultimate layer diffusers reads; 1 is the last layer's states,
    before the final layer norm, in CLIP-L and OpenCLIP-G alike (Forge's and ComfyUI's reading)."""
    prepared = engine.prepare(GenerationRequest(prompt="a red fox", clip_skip=1))
    assert prepared.request.clip_skip == 1
    with engine.models.use("tiny-sdxl", "high", 0) as (pipelines, _):
        pipeline = pipelines.txt2img
        penultimate = conditioning(pipeline, [prepared.prompts], EncodedPrompts(), clip_skip=2)
        last = conditioning(pipeline, [prepared.prompts], EncodedPrompts(), clip_skip=1)
        theirs = pipeline.encode_prompt("a red fox", device=torch.device("cpu"), do_classifier_free_guidance=False)
        ids = pipeline.tokenizer("a red fox", padding="max_length", return_tensors="pt").input_ids
        ids_2 = pipeline.tokenizer_2("a red fox", padding="max_length", return_tensors="pt").input_ids
        with torch.no_grad():
            last_layers = torch.cat(
                [
                    pipeline.text_encoder(ids, output_hidden_states=True).hidden_states[-1],
                    pipeline.text_encoder_2(ids_2, output_hidden_states=True).hidden_states[-1],
                ],
                dim=-1,
            )
    assert torch.equal(penultimate["prompt_embeds"], theirs[0])
    assert torch.equal(last["prompt_embeds"], last_layers)
    assert torch.equal(last["pooled_prompt_embeds"], penultimate["pooled_prompt_embeds"])  # (the pooled one stays)
    assert pixels(image(engine, "a red fox", clip_skip=1)) != pixels(image(engine, "a red fox", clip_skip=2))
    assert pixels(image(engine, "a red fox", clip_skip=2)) == pixels(image(engine, "a red fox"))
    key = engine.batch_key
    assert key(engine.prepare(GenerationRequest(prompt="x", clip_skip=2))) == key(
        engine.prepare(GenerationRequest(prompt="y"))
    )
    assert key(engine.prepare(GenerationRequest(prompt="x", clip_skip=1))) != key(
        engine.prepare(GenerationRequest(prompt="y"))
    )
    with pytest.raises(InvalidRequest, match="clip_skip: 3 is past the first layer") as refused:
        engine.prepare(GenerationRequest(prompt="x", clip_skip=3))  # (tiny-sdxl's encoders have 2 layers)
    assert refused.value.param == "clip_skip"


def test_a_prompt_over_the_chunk_limit_is_refused_before_the_queue(engine):
    breaks = " BREAK ".join(["a"] * 21)  # 21 chunks: one over the default limit of 20
    for field in ("prompt", "negative_prompt"):
        with pytest.raises(InvalidRequest, match=r"21 chunks of 75 tokens .* over the limit of 20") as refused:
            engine.prepare(GenerationRequest(**{"prompt": "x", field: breaks}))
        assert refused.value.param == field
    engine.prepare(GenerationRequest(prompt=" BREAK ".join(["a"] * 20)))  # (at the limit: fine)


def unet_conditions(engine, monkeypatch, **fields) -> tuple[list[torch.Tensor], bytes]:
    """The conditional rows of encoder_hidden_states at each call of the UNet, and the image."""
    from diffusers import UNet2DConditionModel

    seen: list[torch.Tensor] = []
    forward = UNet2DConditionModel.forward

    def recording(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        seen.append(encoder_hidden_states[-1].clone())  # (the conditional row: after the unconditional one)
        return forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording)
    made = engine.generate(engine.prepare(GenerationRequest(**{"seed": 3, "guidance_scale": 5.0, **fields})))
    monkeypatch.undo()
    return seen, made.images[0].data


def encoded(engine, text: str) -> torch.Tensor:
    prepared = engine.prepare(GenerationRequest(prompt=text))
    with engine.models.use("tiny-sdxl", "high", 0) as (pipelines, _):
        return conditioning(pipelines.txt2img, [prepared.prompts], EncodedPrompts())["prompt_embeds"][0]


def test_prompt_editing_swaps_the_conditioning_at_its_step_and_alternation_every_step(engine, monkeypatch):
    red, blue = encoded(engine, "red"), encoded(engine, "blue")
    assert not torch.equal(red, blue)

    def which(conditions: list[torch.Tensor]) -> str:
        return "".join("r" if torch.equal(c, red) else "b" if torch.equal(c, blue) else "?" for c in conditions)

    edited, _ = unet_conditions(engine, monkeypatch, prompt="[red:blue:0.5]", steps=10)
    assert which(edited) == "rrrrrrbbbb"  # steps 0-5 read red, 6-9 blue: A1111's timeline
    alternated, _ = unet_conditions(engine, monkeypatch, prompt="[red|blue]", steps=6)
    assert which(alternated) == "rrbrbr"  # A1111's too: its parts end at steps 1, 2, 3..., read from step 0
    _, whole = unet_conditions(engine, monkeypatch, prompt="[red:blue:1.0]", steps=4)
    assert pixels(whole) == pixels(image(engine, "red"))  # `image`: 4 steps, seed 3, guidance 5
    _, by_step = unet_conditions(engine, monkeypatch, prompt="[red:blue:4]", steps=4)
    assert pixels(by_step) == pixels(image(engine, "red"))
    at_zero, _ = unet_conditions(engine, monkeypatch, prompt="[red:blue:0]", steps=4)
    assert which(at_zero) == "rbbb"  # step 0 reads red, as A1111's does


def test_a_scheduled_prompt_runs_alone_and_not_with_a_second_pass(engine):
    prepared = engine.prepare(GenerationRequest(prompt="[red:blue:0.5]"))
    assert len(prepared.prompts.schedule) == 2 and engine.batch_key(prepared) is None
    with pytest.raises(InvalidRequest, match="do not run with hires_fix") as refused:
        engine.prepare(GenerationRequest(prompt="[red|blue]", hires_fix={"scale": 1.5}))
    assert refused.value.param == "prompt"


def test_comfyuis_rule_moves_a_weighted_token_from_the_empty_prompts_state(engine):
    """ComfyUI's CLIPTextEncode: z = (z - z_empty) x w + z_empty for each weighted token, z_empty the
    empty prompt's states at the same layer, no mean restored; weights of 1 are the plain text."""
    from backends.sdxl_backend.prompts.encoder import text_encoders
    from backends.sdxl_backend.prompts.reader import close_chunk

    def embeds(prompt: str, style: str) -> torch.Tensor:
        prepared = engine.prepare(GenerationRequest(prompt=prompt, prompt_style=style))
        with engine.models.use("tiny-sdxl", "high", 0) as (pipelines, _):
            return conditioning(pipelines.txt2img, [prepared.prompts], EncodedPrompts())["prompt_embeds"][0]

    plain = embeds("fox hat", "comfyui")
    assert torch.equal(embeds("(fox hat:1.0)", "comfyui"), plain)
    weighted = embeds("(fox:1.5) hat", "comfyui")
    with engine.models.use("tiny-sdxl", "high", 0) as (pipelines, _), torch.no_grad():
        empty = torch.cat(
            [
                encoder(torch.tensor([close_chunk([], tokenizer).ids]), output_hidden_states=True).hidden_states[-2][0]
                for encoder, tokenizer, _ in text_encoders(pipelines.txt2img)
            ],
            dim=-1,
        )
    fox = slice(1, 4)  # (the tiny tokenizer: a token per letter, after the start token)
    assert torch.allclose(weighted[fox], (plain[fox] - empty[fox]) * 1.5 + empty[fox], atol=1e-6)
    assert torch.equal(weighted[4:], plain[4:])  # the other tokens as they were: no mean restored
    assert not torch.equal(embeds("(fox:1.5) hat", "a1111"), weighted)  # A1111's rule is another
    assert pixels(image(engine, "(fox:1.5) hat", prompt_style="comfyui")) != pixels(image(engine, "(fox:1.5) hat"))
