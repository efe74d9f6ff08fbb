"""`python -m models` as a user runs it, each test on its own empty BentoML store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from models.hub_files import select_component_files, select_files
from tests.conftest import HUB_SHA, hub_snapshot
from tests.served import ROOT


def test_import_tiny_list_and_remove(cli, tmp_path, tiny_model):
    imported = cli("import", "tiny-sdxl")
    assert imported.returncode == 0, imported.stderr
    assert "imported tiny-sdxl as tiny-sdxl:" in imported.stdout
    # Built twice (here and for the session's store), the same weights: tiny-sdxl is deterministic.
    unet = Path("unet") / "diffusion_pytorch_model.safetensors"
    version = next(p for p in (tmp_path / "bentoml" / "models" / "tiny-sdxl").iterdir() if p.is_dir())
    assert (version / unet).read_bytes() == (Path(tiny_model.path) / unet).read_bytes()
    again = cli("import", "tiny-sdxl")
    assert "already in the store" in again.stdout

    listing = cli("list").stdout
    tiny_row = next(line for line in listing.splitlines() if line.startswith("tiny-sdxl"))
    assert "tiny-sdxl:" in tiny_row and "MiB" in tiny_row
    base_row = next(line for line in listing.splitlines() if line.startswith("sdxl-base "))
    assert " - " in base_row  # in the catalog, not in the store

    removed = cli("remove", "tiny-sdxl")
    assert removed.returncode == 0 and "removed tiny-sdxl:" in removed.stdout
    assert cli("remove", "tiny-sdxl").returncode == 1


def test_a_vae_imports_as_a_component_listed_apart_from_the_models(cli, tmp_path):
    imported = cli("import", "tiny-sdxl-vae")
    assert imported.returncode == 0, imported.stderr
    version = next(p for p in (tmp_path / "bentoml" / "models" / "tiny-sdxl-vae").iterdir() if p.is_dir())
    assert json.loads((version / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    assert "sdxl_kind: vae" in (version / "model.yaml").read_text()
    row = next(line for line in cli("list").stdout.splitlines() if line.startswith("tiny-sdxl-vae"))
    assert "tiny-sdxl-vae:" in row and "[VAE, for SDXL_VAE]" in row
    # A store that holds only a VAE holds no model to serve: ensure-default imports one.
    assert "imported tiny-sdxl as tiny-sdxl:" in cli("ensure-default", SDXL_DEFAULT_MODEL="tiny-sdxl").stdout


def test_import_from_a_diffusers_directory(cli, tiny_model):
    imported = cli("import", "my-sdxl", "--from", tiny_model.path)
    assert imported.returncode == 0, imported.stderr
    listing = cli("list").stdout
    row = next(line for line in listing.splitlines() if line.startswith("my-sdxl"))
    assert f"local:{tiny_model.path}" in row


def test_a_pipeline_imports_with_the_sampling_facts_given_or_marked_in_its_file(cli, tiny_model, tmp_path):
    import torch
    from safetensors.torch import save_file

    from backends.sdxl_backend.models.schedulers import ModelSampling, model_sampling
    from models.sampling_facts import single_file_sampling

    imported = cli("import", "my-vpred", "--from", tiny_model.path, "--prediction", "v", "--zero-snr")
    assert imported.returncode == 0, imported.stderr
    (config,) = (tmp_path / "bentoml" / "models").glob("**/scheduler/scheduler_config.json")
    assert model_sampling(config.parent.parent) == ModelSampling("v_prediction", True)
    assert json.loads(config.read_text())["timestep_spacing"] == "trailing"  # (zero-SNR models reach their last step)
    # A single file says it with empty tensors (what the converted checkpoint's import reads).
    marked, plain = tmp_path / "marked.safetensors", tmp_path / "plain.safetensors"
    save_file({"v_pred": torch.zeros(0), "ztsnr": torch.zeros(0), "model.diffusion_model.x": torch.zeros(1)}, marked)
    save_file({"model.diffusion_model.x": torch.zeros(1)}, plain)
    assert single_file_sampling(marked) == ("v", True) and single_file_sampling(plain) == (None, None)


def test_the_catalogs_v_prediction_model_imports_with_its_sampling_facts(cli, tiny_model, tmp_path):
    """noobai-xl-vpred's repo does not state them in its scheduler config; the catalog does, and
    the import writes them (here from a hub cache laid out as the repo, with tiny weights)."""
    import shutil

    from backends.sdxl_backend.models.schedulers import ModelSampling, model_sampling
    from models.catalog import load_catalog

    entry = load_catalog()["noobai-xl-vpred"]
    snapshot, hub = hub_snapshot(tmp_path, entry.repo)
    shutil.copytree(tiny_model.path, snapshot, ignore=shutil.ignore_patterns("model.yaml"), dirs_exist_ok=True)
    imported = cli("import", "noobai-xl-vpred", **hub)
    assert imported.returncode == 0, imported.stderr
    assert "fair-ai-public-license" in imported.stdout + imported.stderr  # (its licence, said at import)
    (config,) = (tmp_path / "bentoml" / "models" / "noobai-xl-vpred").glob("*/scheduler/scheduler_config.json")
    assert model_sampling(config.parent.parent) == ModelSampling("v_prediction", True)
    assert (
        json.loads((Path(tiny_model.path) / "scheduler" / "scheduler_config.json").read_text()).get(
            "prediction_type", "epsilon"
        )
        == "epsilon"
    )  # (the source's own config is untouched)


def test_a_controlnet_imports_from_its_directory_fitting_the_model_named(cli, tiny_model, tiny_controlnet):
    imported = cli("import", "my-controlnet", "--from", tiny_controlnet.path, "--fits", "tiny-sdxl")
    assert imported.returncode == 1 and "--fits tiny-sdxl: no such model in the store" in imported.stderr
    assert cli("import", "tiny-sdxl", "--from", tiny_model.path).returncode == 0  # (the session's, copied: quicker)
    imported = cli("import", "my-controlnet", "--from", tiny_controlnet.path, "--fits", "tiny-sdxl")
    assert imported.returncode == 0, imported.stderr
    row = next(line for line in cli("list").stdout.splitlines() if line.startswith("my-controlnet"))
    assert "[ControlNet]" in row
    from models.store import stored_model

    assert stored_model("tiny-sdxl-controlnet").info.labels["fits"] == "8,16,32/32"


def test_importing_from_a_bentoml_model_leaves_the_source_intact(cli, tiny_model):
    from models.store import stored_model

    source = Path(stored_model("tiny-sdxl").path)
    source_yaml = (source / "model.yaml").read_text()
    assert cli("import", "my-copy", "--from", str(source)).returncode == 0
    assert (source / "model.yaml").read_text() == source_yaml


def test_hub_import_with_hf_hub_offline_uses_the_cache(tmp_path, monkeypatch, tiny_model):
    """HF_HUB_OFFLINE=1 and the files already in the hub cache: imported without the network
    (HF_ENDPOINT points at a closed port, so any request would fail)."""
    import shutil

    snapshot, hub = hub_snapshot(tmp_path, "example/tiny-sdxl")
    shutil.copytree(tiny_model.path, snapshot, ignore=shutil.ignore_patterns("model.yaml"), dirs_exist_ok=True)
    code = (
        "from models.catalog import CatalogEntry; from models.store import import_from_hub; "
        "m = import_from_hub(CatalogEntry(id='cached-sdxl', description='d', repo='example/tiny-sdxl')); "
        "print(m.info.labels['revision'], m.info.labels['variant'])"
    )
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), **hub}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == [HUB_SHA, "none"]


def test_import_from_a_path_that_is_not_a_model(cli, tmp_path):
    result = cli("import", "junk", "--from", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: {tmp_path} is not a diffusers directory (no model_index.json, nor a ControlNet's config.json)"
    )


def test_hub_out_of_reach_is_one_clear_line(cli):
    # Not a mock: the hub endpoint is a closed local port, as unreachable as the real hub is here.
    result = cli("import", "sdxl-turbo", HF_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot download stabilityai/sdxl-turbo from the Hugging Face hub")
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unknown_id_and_bad_id(cli, tiny_model):
    unknown = cli("import", "sdxl-nope")
    assert unknown.returncode == 1 and "unknown model 'sdxl-nope'" in unknown.stderr
    bad = cli("import", "Bad Name", "--from", tiny_model.path)
    assert bad.returncode == 1 and "not a valid model id" in bad.stderr


def test_ensure_default_falls_back_to_tiny_when_the_hub_is_out_of_reach(cli):
    result = cli("ensure-default", HF_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode == 0, result.stderr
    assert "WARNING: could not import sdxl-base" in result.stderr
    assert "imported tiny-sdxl" in result.stdout
    assert cli("ensure-default").stdout == ""  # the store has a model now: nothing to do


SDXL_BASE_FILES = [
    ".gitattributes",
    "01.png",
    "LICENSE.md",
    "README.md",
    "comparison.png",
    "model_index.json",
    "pipeline.png",
    "sd_xl_base_1.0.safetensors",
    "sd_xl_base_1.0_0.9vae.safetensors",
    "sd_xl_offset_example-lora_1.0.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/flax_model.msgpack",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/model.onnx",
    "text_encoder/model.safetensors",
    "text_encoder/openvino_model.bin",
    "text_encoder_2/config.json",
    "text_encoder_2/model.fp16.safetensors",
    "text_encoder_2/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_flax_model.msgpack",
    "unet/model.onnx",
    "unet/model.onnx_data",
    "unet/openvino_model.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "vae_1_0/config.json",
    "vae_1_0/diffusion_pytorch_model.fp16.safetensors",
    "vae_decoder/config.json",
    "vae_decoder/model.onnx",
]
SDXL_BASE_INDEX = json.loads("""{
  "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.19.0.dev0", "force_zeros_for_empty_prompt": true,
  "scheduler": ["diffusers", "EulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
  "tokenizer_2": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]}""")


def test_hub_file_selection_keeps_only_fp16_safetensors_and_configs():
    chosen = select_files(SDXL_BASE_FILES, SDXL_BASE_INDEX)
    assert sorted(chosen) == sorted(
        [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.fp16.safetensors",
            "text_encoder_2/config.json",
            "text_encoder_2/model.fp16.safetensors",
            "tokenizer/merges.txt",
            "tokenizer/special_tokens_map.json",
            "tokenizer/tokenizer_config.json",
            "tokenizer/vocab.json",
            "tokenizer_2/merges.txt",
            "tokenizer_2/special_tokens_map.json",
            "tokenizer_2/tokenizer_config.json",
            "tokenizer_2/vocab.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.fp16.safetensors",
        ]
    )


def test_hub_file_selection_without_fp16_takes_plain_safetensors_and_shards():
    files = [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
        "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
        "unet/diffusion_pytorch_model.safetensors.index.json",
        "unet/diffusion_pytorch_model.bin",
    ]
    chosen = select_files(files, {"unet": ["diffusers", "UNet2DConditionModel"], "image_encoder": [None, None]})
    assert sorted(chosen) == sorted(files[:5])


def test_hub_file_selection_for_a_vae_takes_its_config_and_diffusers_weights():
    files = [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.safetensors",
        "sdxl.vae.safetensors",
        "sdxl_vae.safetensors",
        "images/compare.png",
    ]
    assert select_component_files(files) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert select_component_files([*files, "diffusion_pytorch_model.fp16.safetensors"]) == [
        "config.json",
        "diffusion_pytorch_model.fp16.safetensors",
    ]
    union = ["README.md", "config.json", "diffusion_pytorch_model.safetensors"]
    union += ["diffusion_pytorch_model_promax.safetensors", "images/000000_canny_concat.webp"]
    assert select_component_files(union) == ["config.json", "diffusion_pytorch_model.safetensors"]  # (not promax)
