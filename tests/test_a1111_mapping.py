"""The A1111 dialect's mapping, called as is (no server): what each field of an A1111 request
means here, and A1111's parameters text written and read back. The served behaviour, with the
`webuiapi` client, is in test_a1111.py."""

from __future__ import annotations

import pytest

from backends.api.a1111.mapping import SCHEDULES, generation_request, progress, samplers, take_loras
from backends.api.a1111.protocol import A1111Request
from backends.sdxl_backend.errors import InvalidRequest
from backends.sdxl_backend.generation import infotext
from backends.sdxl_backend.image_bytes import TINY_PNG
from backends.sdxl_backend.models.schedulers import SCHEDULERS
from backends.sdxl_backend.protocol import GenerationRequest
from backends.sdxl_backend.units import LoraWeight


def mapped(img2img: bool = False, **fields) -> GenerationRequest:
    return generation_request(A1111Request.model_validate({"prompt": "a fox", **fields}), img2img)


def test_the_common_fields_map_to_the_native_request():
    request = mapped(
        sampler_name="DPM++ 2M",
        scheduler="Karras",
        seed=-1,
        batch_size=2,
        n_iter=3,
        cfg_scale=6.5,
        steps=12,
        width=512,
        height=768,
        override_settings={"sd_model_checkpoint": "tiny-sdxl [abc123]"},
    )
    assert request.scheduler == "dpmpp_2m_karras" and request.seed is None and request.n == 6
    assert (request.guidance_scale, request.steps, request.width, request.height) == (6.5, 12, 512, 768)
    assert request.model == "tiny-sdxl"  # the name in an A1111 title, "name [hash]"
    assert mapped(sampler_name="Euler a Karras").scheduler == "euler_a"  # (no Karras form: the sampler as is)
    assert mapped(sampler_index="k_euler").scheduler == "euler"  # the older field and name


def test_lora_tags_leave_the_prompt_and_become_loras():
    request = mapped(prompt="a fox <lora:ink:0.6>, in snow <lyco:paper>")
    assert request.prompt == "a fox, in snow"
    assert [(lora.id, lora.weight) for lora in request.loras] == [("ink", 0.6), ("paper", 1.0)]
    assert mapped(prompt="a fox <lora:ink:0.6>", disable_extra_networks=True).loras == []
    with pytest.raises(InvalidRequest) as refused:
        mapped(prompt="a fox <lora:ink:strong>")
    assert refused.value.param == "prompt"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"restore_faces": True}, "restore_faces"),
        ({"script_name": "Outpainting mk2"}, "script_name"),  # (outpainting is the native field `outpaint`)
        ({"subseed": 42}, "subseed"),
        ({"override_settings": {"eta_noise_seed_delta": 31337}}, "override_settings.eta_noise_seed_delta"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 13}}, "override_settings.CLIP_stop_at_last_layers"),
        ({"override_settings": {"sd_vae": "other-vae.safetensors"}}, "override_settings.sd_vae"),
        (
            {"override_settings": {"forge_additional_modules": ["x.safetensors"]}},
            "override_settings.forge_additional_modules",
        ),
        ({"clip_skip": 13}, "clip_skip"),
        ({"sampler_name": "Unheard Of"}, "sampler_name"),
        ({"sampler_name": "Euler a", "scheduler": "Exponential"}, "scheduler"),
        ({"scheduler": "Cosine"}, "scheduler"),
        ({"sampler_name": "DPM++ 2M SDE"}, "scheduler"),  # (A1111's automatic for it is exponential: not here)
        ({"enable_hr": True, "hr_upscaler": "Latent (antialiased)"}, "hr_upscaler"),
        ({"alwayson_scripts": {"ADetailer": {"args": [{}]}}}, "alwayson_scripts.adetailer"),
        ({"sampler_name": "Euler a", "eta": 0.5}, "eta"),
    ],
)
def test_a_field_turned_on_that_this_server_does_not_do_is_refused_by_name(fields, param):
    with pytest.raises(InvalidRequest) as refused:
        mapped(**fields)
    assert refused.value.param == param


def test_fields_at_their_a1111_defaults_pass():
    request = mapped(
        subseed=-1,
        restore_faces=False,
        s_noise=1.0,
        resize_mode=0,
        styles=[],
        script_name="",
        alwayson_scripts={"controlnet": {"args": []}},
    )
    assert request.prompt == "a fox" and request.controlnets == []


def test_clip_skip_is_read_as_forge_reads_it_for_sdxl():
    """Forge reads layer max(n, 2) from the last in both encoders; A1111 (its "Clip skip SDXL"
    option off) reads the penultimate whatever n: 1 and 2 agree everywhere on SDXL's own."""
    assert mapped().clip_skip is None  # the model's default (2)
    assert mapped(override_settings={"CLIP_stop_at_last_layers": 1}).clip_skip == 2
    assert mapped(override_settings={"CLIP_stop_at_last_layers": 3}).clip_skip == 3
    assert mapped(clip_skip=4).clip_skip == 4  # SD.Next's top-level field ...
    assert mapped(clip_skip=4, override_settings={"CLIP_stop_at_last_layers": 3}).clip_skip == 3  # ... under A1111's
    kept = {"CLIP_stop_at_last_layers": 5, "sd_model_checkpoint": "tiny-sdxl"}  # (set with POST /options)
    assert generation_request(A1111Request(prompt="x"), False, kept).clip_skip == 5
    assert generation_request(A1111Request(prompt="x", clip_skip=3), False, kept).clip_skip == 3


def test_the_vae_options_name_the_models_own_or_the_served_vae():
    for name in ("Automatic", "None", ""):
        assert mapped(override_settings={"sd_vae": name, "forge_additional_modules": []}).prompt == "a fox"
    served = A1111Request(prompt="x", override_settings={"forge_additional_modules": ["fp16-vae.safetensors"]})
    assert generation_request(served, False, served_vae="fp16-vae").prompt == "x"
    with pytest.raises(InvalidRequest, match=r"'fp16-vae' .SDXL_VAE. or 'Automatic'"):
        generation_request(
            A1111Request(prompt="x", override_settings={"sd_vae": "other"}), False, served_vae="fp16-vae"
        )


@pytest.mark.parametrize(
    ("sampler", "schedule", "scheduler"),
    [
        ("DPM++ 2M", "Karras", "dpmpp_2m_karras"),
        ("DPM++ 2M Karras", None, "dpmpp_2m_karras"),  # the old single name: the same scheduler
        ("DPM++ 2M", "Automatic", "dpmpp_2m_karras"),  # A1111 1.9's automatic for DPM++ 2M is Karras
        ("DPM++ 2M", "exponential", "dpmpp_2m_exponential"),
        ("DPM++ 2M SDE", "karras", "dpmpp_2m_sde_karras"),
        ("Euler", "sgm_uniform", "euler_sgm_uniform"),
        ("Euler", "Align Your Steps", "euler_ays"),
        ("Euler a", "Automatic", "euler_a"),
        ("DDIM", "normal", "ddim"),  # SillyTavern's defaults: A1111 runs DDIM on its own schedule
    ],
)
def test_a_sampler_and_a_schedule_name_one_scheduler(sampler, schedule, scheduler):
    assert mapped(sampler_name=sampler, scheduler=schedule).scheduler == scheduler


def test_every_listed_sampler_with_every_listed_schedule_is_a_scheduler_or_a_400_naming_it():
    for sampler in [entry["name"] for entry in samplers()]:
        for schedule in SCHEDULES:
            try:
                scheduler, refused_field = mapped(sampler_name=sampler, scheduler=schedule).scheduler, None
            except InvalidRequest as refused:
                scheduler, refused_field = None, refused.param
            assert scheduler in SCHEDULERS or refused_field == "scheduler", (sampler, schedule)


def test_sillytaverns_exact_body_maps_and_its_own_fields_change_nothing():
    from tests.test_chat_clients import sillytavern_body  # (its defaults, its source file named there)

    body = {**sillytavern_body("http://localhost:7860"), "steps": 20, "width": 512, "height": 512}
    request = generation_request(A1111Request.model_validate(body), False)
    assert (request.scheduler, request.steps, request.clip_skip, request.width) == ("ddim", 20, 2, 512)


def test_hires_fix_and_img2img_inpainting():
    hires = mapped(
        enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos", denoising_strength=0.4, hr_second_pass_steps=5
    ).hires_fix
    assert (hires.scale, hires.upscaler, hires.strength, hires.steps) == (1.5, "lanczos", 0.4, 5)
    # An upscale model by the title A1111 lists it under, or by its id (the server checks it is served).
    assert mapped(enable_hr=True, hr_upscaler="R-ESRGAN 4x+").hires_fix.upscaler == "realesrgan-x4plus"
    assert mapped(enable_hr=True, hr_upscaler="Tiny-Upscaler").hires_fix.upscaler == "tiny-upscaler"
    assert mapped(True, init_images=[TINY_PNG], enable_hr=True).hires_fix is None  # A1111's img2img ignores it
    inpaint = mapped(
        True, init_images=[TINY_PNG], mask=TINY_PNG, inpainting_fill=1, inpainting_mask_invert=1, denoising_strength=0.5
    )
    assert inpaint.masked_content == "original" and inpaint.mask_invert and inpaint.strength == 0.5
    with pytest.raises(InvalidRequest) as refused:
        mapped(mask=TINY_PNG)
    assert refused.value.param == "mask"  # txt2img takes no mask
    with pytest.raises(InvalidRequest) as refused:
        mapped(True, init_images=[TINY_PNG, TINY_PNG])
    assert refused.value.param == "init_images"


def test_a_controlnet_unit_maps_as_the_extension_means_it():
    unit = {
        "module": "canny",
        "model": "tiny-controlnet [0a1b]",
        "weight": 0.8,
        "resize_mode": "Just Resize",
        "control_mode": "ControlNet is more important",
        "threshold_a": -1,
        "threshold_b": 180,
    }
    (control,) = mapped(True, init_images=[TINY_PNG], alwayson_scripts={"ControlNet": {"args": [unit]}}).controlnets
    assert (control.id, control.scale, control.resize_mode, control.guess_mode) == (
        "tiny-controlnet",
        0.8,
        "stretch",
        True,
    )
    assert (control.low_threshold, control.high_threshold) == (100, 180)  # -1: the extension's default
    assert control.image  # img2img without a unit image: the input image
    with pytest.raises(InvalidRequest) as refused:
        mapped(alwayson_scripts={"controlnet": {"args": [{**unit, "module": "openpose"}]}})
    assert refused.value.param == "alwayson_scripts.controlnet.args[0].module"


def test_ip_adapter_units_map_to_image_prompts_as_the_extension_and_forge_name_them():
    canny = {"module": "canny", "model": "tiny-controlnet", "image": TINY_PNG}
    for module in ("ip-adapter_clip_sdxl_plus_vith", "ip-adapter-auto", "CLIP-ViT-H (IPAdapter)"):
        unit = {"module": module, "model": "ip-adapter-sdxl [7ab1]", "weight": 0.7, "image": TINY_PNG}
        request = mapped(alwayson_scripts={"controlnet": {"args": [canny, unit]}})
        (prompt,) = request.ip_adapters
        assert (prompt.id, prompt.scale, bool(prompt.image)) == ("ip-adapter-sdxl", 0.7, True)
        assert [control.id for control in request.controlnets] == ["tiny-controlnet"]
    unit = {"module": "ip-adapter-auto", "model": "ip-adapter-sdxl"}
    assert mapped(True, init_images=[TINY_PNG], alwayson_scripts={"controlnet": {"args": [unit]}}).ip_adapters
    for refused_unit, param in [
        (unit, "image"),  # txt2img: no input image to read
        ({**unit, "image": TINY_PNG, "module": "ip-adapter_face_id_plus"}, "module"),
        ({**unit, "image": TINY_PNG, "guidance_start": 0.2}, "guidance_start"),
        ({**unit, "image": TINY_PNG, "model": "None"}, "model"),
    ]:
        with pytest.raises(InvalidRequest) as refused:
            mapped(alwayson_scripts={"controlnet": {"args": [refused_unit]}})
        assert refused.value.param == f"alwayson_scripts.controlnet.args[0].{param}"


def test_progress_when_nothing_runs():
    answer = progress(None, preview=True)
    assert answer["progress"] == 0.0 and answer["state"]["job_count"] == 0 and answer["current_image"] is None


def test_the_parameters_text_is_read_back_as_it_was_written():
    request = GenerationRequest(
        prompt="a fox, in snow",
        negative_prompt="blurry",
        steps=12,
        width=512,
        height=768,
        guidance_scale=6.5,
        scheduler="euler_a",
        clip_skip=2,
        model="tiny-sdxl",
    )
    text = infotext.write(request, 1234, img2img=False, inpainting=False)
    parsed = infotext.parse(text)
    assert parsed["Prompt"] == "a fox, in snow" and parsed["Negative prompt"] == "blurry"
    assert (parsed["Steps"], parsed["Sampler"], parsed["CFG scale"], parsed["Seed"]) == ("12", "Euler a", "6.5", "1234")
    assert (parsed["Size-1"], parsed["Size-2"], parsed["Model"], parsed["Clip skip"]) == (
        "512",
        "768",
        "tiny-sdxl",
        "2",
    )
    assert infotext.parse("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}


def test_the_parameters_text_keeps_the_loras_as_a1111_tags_weight_zero_too():
    request = GenerationRequest(
        prompt="a fox",
        loras=[LoraWeight(id="tiny-sdxl-lora", weight=0.0), LoraWeight(id="b", weight=0.75)],
        scheduler="euler",
        clip_skip=1,
        model="tiny-sdxl",
    )
    parsed = infotext.parse(infotext.write(request, 1, img2img=False, inpainting=False))
    assert parsed["Prompt"] == "a fox <lora:tiny-sdxl-lora:0> <lora:b:0.75>" and "Clip skip" not in parsed
    assert take_loras(parsed["Prompt"]) == ("a fox", request.loras)  # read back, it asks for the same


def test_the_cfg_rescale_extensions_script_is_the_rescale_and_its_switches_are_refused_when_on():
    script = "CFG Rescale Extension"  # (its title; the args as its UI lists them: rescale, Auto Color Fix, ...)
    assert mapped(alwayson_scripts={script: {"args": [0.7, False, 1.0, False]}}).guidance_rescale == 0.7
    assert mapped().guidance_rescale is None  # the model's default
    for args, param in (([0.7, True], "args[1]"), ([1.5], "args[0]"), ([], "args")):
        with pytest.raises(InvalidRequest) as refused:
            mapped(alwayson_scripts={script: {"args": args}})
        assert refused.value.param == f"alwayson_scripts.cfg rescale extension.{param}"


def test_forges_pag_script_is_pag_scale_at_every_step():
    """Forge's built-in script (extensions-builtin/sd_forge_perturbed_attention/scripts/
    forge_perturbed_attention.py): its title, args [enabled, scale, attenuation, start step,
    end step] (its first versions: [enabled, scale]). PAG here runs every step at full scale."""
    script = "PerturbedAttentionGuidance Integrated"
    assert mapped(alwayson_scripts={script: {"args": [True, 3.0, 0.0, 0.0, 1.0]}}).pag_scale == 3.0
    assert mapped(alwayson_scripts={script: {"args": [True, 2.5]}}).pag_scale == 2.5
    assert mapped(alwayson_scripts={script: {"args": [False, 3.0, 50.0, 0.2, 0.6]}}).pag_scale == 0  # (off)
    assert mapped().pag_scale == 0
    for args, param in (
        ([True, 3.0, 10.0], "args[2]"),
        ([True, 3.0, 0.0, 0.15, 0.6], "args[3]"),
        ([True, 30], "args[1]"),
    ):
        with pytest.raises(InvalidRequest) as refused:
            mapped(alwayson_scripts={script: {"args": args}})
        assert refused.value.param == f"alwayson_scripts.perturbedattentionguidance integrated.{param}"
