"""Upscale models: stored and imported (a .pth, the hub's cache), run in tiles that agree with
one piece, stopped between tiles, counted in the memory budget; served at /v1/upscale, to A1111
clients' Extras tab and hires fix. tiny-upscaler, a 4x ESRGAN with random weights, stands in
for Real-ESRGAN."""

from __future__ import annotations

import base64
import contextlib
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from backends.sdxl_backend.device import select_placement
from backends.sdxl_backend.errors import BackendError, Cancelled
from backends.sdxl_backend.generation.engine import Engine
from backends.sdxl_backend.models.manager import ModelManager
from backends.sdxl_backend.models.records import ModelSource
from backends.sdxl_backend.models.upscalers import (
    UPSCALER_CARD,
    UPSCALER_FILE,
    Tiling,
    UpscalerSource,
    load_upscaler,
    tile_count,
    upscale,
)
from backends.sdxl_backend.protocol import GenerationRequest
from backends.sdxl_backend.upscale_protocol import UpscaleRequest
from models.catalog import defaults_for, load_catalog
from tests.conftest import hub_snapshot, nothing_loaded, pixels, png_bytes

UPSCALER = "tiny-upscaler"


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def model(tiny_upscaler):
    return load_upscaler(Path(tiny_upscaler.path), select_placement("cpu"))


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_upscaler) -> Engine:
    source = ModelSource("tiny-sdxl", Path(tiny_model.path), defaults_for("tiny-sdxl"))
    upscaler = UpscalerSource(UPSCALER, Path(tiny_upscaler.path))
    return Engine(ModelManager([source], select_placement(), upscalers=[upscaler]), "tiny-sdxl", tiling=Tiling(48, 8))


def test_the_tiny_upscaler_is_stored_with_its_card(tiny_upscaler):
    stored = Path(tiny_upscaler.path)
    assert (stored / UPSCALER_FILE).is_file()
    assert tiny_upscaler.info.labels["sdxl_kind"] == "upscaler"
    source = UpscalerSource(UPSCALER, stored)
    assert source.scale == 4 and source.card["architecture"] == "ESRGAN"


def test_tiles_agree_with_one_piece_on_their_overlaps(model):
    """Tiles that overlap and blend agree with the whole picture run at once to within rounding;
    the same tiles butted together (no overlap) do not: the blend is what makes them agree."""
    picture = noise(96, 80)
    whole = np.asarray(upscale(model, picture, (384, 320), Tiling(0, 0))).astype(int)
    blended = np.asarray(upscale(model, picture, (384, 320), Tiling(32, 8))).astype(int)
    butted = np.asarray(upscale(model, picture, (384, 320), Tiling(32, 0))).astype(int)
    assert whole.shape == (320, 384, 3)
    assert np.abs(whole - blended).max() <= 2
    assert np.abs(whole - butted).max() > 8


def test_a_target_beyond_one_pass_takes_more_and_ends_at_the_exact_size(model):
    seen: list[tuple[int, int]] = []
    picture = upscale(model, noise(20, 16), (300, 250), Tiling(48, 8), lambda done, total: seen.append((done, total)))
    assert picture.size == (300, 250)
    # Two passes: 20x16 (one tile), then 80x64 (2 x 2 tiles of 48 overlapping by at least 8).
    assert seen == [(i, 5) for i in range(1, 6)] and tile_count((80, 64), 48, 8) == 4


def test_an_upscale_tells_each_tile_and_stops_between_two_when_its_observer_raises(engine):
    prepared = engine.upscaling.prepare(UpscaleRequest(image=png_bytes(96, 96, (10, 200, 30)), upscaler=UPSCALER))
    heard: list[tuple[int, int]] = []

    def on_tile(done: int, total: int, latents) -> None:  # (as a job's step observer hears them)
        heard.append((done, total))
        if done == 2:
            raise Cancelled(f"cancelled after {done} of {total} tiles")

    with pytest.raises(Cancelled, match="after 2 of 9 tiles"):
        engine.upscaling.run(prepared, on_tile)
    assert heard == [(1, 9), (2, 9)]


def test_upscales_are_checked_before_the_device(engine):
    def refused(**fields) -> BackendError:
        with pytest.raises(BackendError) as caught:
            engine.upscaling.prepare(UpscaleRequest(**{"image": png_bytes(64, 64), "upscaler": UPSCALER, **fields}))
        return caught.value

    assert refused(upscaler="x4-nothing").param == "upscaler"
    assert "over the limit" in refused(scale=8, image=png_bytes(1024, 1024)).message
    assert refused(width=64 * 4**3 + 8, height=64).param == "upscaler"  # (beyond three passes of 4x)
    hires = {"prompt": "a lighthouse", "hires_fix": {"scale": 2, "upscaler": "x4-nothing"}}
    with pytest.raises(BackendError, match=r"hires_fix\.upscaler: unknown upscaler 'x4-nothing'"):
        engine.prepare(GenerationRequest(**hires))


def test_a_hires_fix_upscales_with_the_model_and_its_memory_is_counted(engine):
    def hires(upscaler: str) -> tuple[bytes, Image.Image]:
        fields = {"prompt": "a lighthouse", "seed": 3, "width": 64, "height": 64, "steps": 4}
        request = GenerationRequest(**fields, hires_fix={"scale": 2, "upscaler": upscaler, "strength": 0.5})
        image = engine.generate(engine.prepare(request)).images[0]
        return pixels(image.data), Image.open(io.BytesIO(image.data))

    with_model, picture = hires(UPSCALER)
    assert picture.size == (128, 128)
    assert with_model != hires("lanczos")[0]
    status = engine.models.status()
    assert [entry["id"] for entry in status["upscalers"]] == [UPSCALER]
    weights = (Path(engine.models.upscalers[UPSCALER].path) / UPSCALER_FILE).stat().st_size
    assert 0.9 * weights < status["upscalers"][0]["bytes"] <= weights  # (float32 here: as stored, less the header)
    assert engine.models.unload() and not engine.models.status()["upscalers"]


def test_a_hires_fix_counts_the_upscalers_tiles_as_steps_and_stops_between_them(engine):
    """64 px upscaled to 128 in 2 x 2 tiles of 48 between 4 first-pass steps and 2 second-pass
    ones: the steps run on from 1 to 10; a cancel at the third tile is the last thing seen."""

    def run(cancel_at: int | None) -> list[tuple[int, int]]:
        seen: list[tuple[int, int]] = []

        def on_step(step: int, total: int, latents) -> bool:
            seen.append((step, total))
            if len(seen) == cancel_at:
                raise Cancelled("cancelled by the test")
            return False

        fields = {"prompt": "a lighthouse", "seed": 3, "width": 64, "height": 64, "steps": 4}
        request = GenerationRequest(**fields, hires_fix={"scale": 2, "upscaler": UPSCALER, "strength": 0.5})
        with contextlib.suppress(Cancelled):
            engine.generate(engine.prepare(request), on_step)
        return seen

    first_pass = [(step, 4 + 2) for step in range(1, 5)]
    assert run(None) == first_pass + [(step, 4 + 4 + 2) for step in range(5, 11)]
    assert run(7) == [*first_pass, (5, 10), (6, 10), (7, 10)]


def test_import_a_pth_and_the_catalogs_upscaler_from_the_hub_cache(tmp_path, cli, tiny_upscaler):
    """`--from FILE.pth` (an upscaler as Real-ESRGAN's authors save it: a pickled state dict
    under `params_ema`); and realesrgan-x4plus from a hub cache laid out as its repo, with
    HF_HUB_OFFLINE=1 (HF_ENDPOINT on a closed port: no network)."""
    from safetensors.torch import load_file

    pth = tmp_path / "RealESRGAN_x4plus.pth"
    torch.save({"params_ema": load_file(Path(tiny_upscaler.path) / UPSCALER_FILE)}, pth)

    imported = cli("import", "my-upscaler", "--from", str(pth))
    assert imported.returncode == 0, imported.stderr
    row = next(line for line in cli("list").stdout.splitlines() if line.startswith("my-upscaler"))
    assert "[upscaler]" in row
    not_one = tmp_path / "not-an-upscaler.pth"
    torch.save({"weight": torch.zeros(3)}, not_one)
    refused = cli("import", "nothing", "--from", str(not_one))
    assert refused.returncode == 1 and "not an upscale model" in refused.stderr

    entry = load_catalog()["realesrgan-x4plus"]
    snapshot, hub = hub_snapshot(tmp_path, entry.repo)
    (snapshot / entry.weights).write_bytes(pth.read_bytes())
    imported = cli("import", "realesrgan-x4plus", **hub)
    assert imported.returncode == 0, imported.stderr
    version = next(p for p in (tmp_path / "bentoml" / "models" / "realesrgan-x4plus").iterdir() if p.is_dir())
    assert sorted(f.name for f in version.iterdir()) == ["model.yaml", UPSCALER_CARD, UPSCALER_FILE]
    assert cli("remove", "realesrgan-x4plus").returncode == 0


@pytest.mark.served
def test_clients_upscale_through_the_native_api_and_the_extras_tab(side_models_server):
    """(The server cuts upscales in tiles of 48 pixels, 8 shared.)"""
    import webuiapi

    server = side_models_server
    nothing_loaded(server)
    listed = httpx.get(f"{server.url}/v1/upscalers", timeout=300).json()["data"]
    assert {"id": UPSCALER, "architecture": "ESRGAN", "scale": 4, "loaded": False}.items() <= listed[0].items()
    source = png_bytes(40, 30, (200, 120, 40))

    answer = httpx.post(
        f"{server.url}/v1/upscale",
        json={"image": base64.b64encode(source).decode(), "upscaler": UPSCALER, "scale": 3},
        timeout=300,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["width"], body["height"], body["passes"], body["tiles"]) == (120, 90, 1, 1)
    assert Image.open(io.BytesIO(base64.b64decode(body["b64_json"]))).size == (120, 90)
    raw = httpx.post(
        f"{server.url}/v1/upscale",
        json={"image": base64.b64encode(source).decode(), "upscaler": "lanczos", "width": 80},
        headers={"accept": "image/png"},
        timeout=300,
    )
    assert raw.headers["content-type"] == "image/png" and Image.open(io.BytesIO(raw.content)).size == (80, 60)
    refused = httpx.post(
        f"{server.url}/v1/upscale", json={"image": base64.b64encode(source).decode(), "upscaler": "x"}, timeout=300
    )
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "upscaler"

    # An A1111 client, on its defaults but for the upscaler it names (as listed).
    a1111 = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    names = [upscaler["name"] for upscaler in a1111.get_upscalers()]
    assert names == ["None", "Lanczos", UPSCALER]
    picture = Image.open(io.BytesIO(source))
    assert a1111.extra_single_image(picture, upscaler_1=UPSCALER).image.size == (80, 60)
    assert a1111.extra_single_image(picture).image.size == (40, 30)  # ("None": as it came, as A1111 does)
    # To 100 x 50: covered (2.5x: 100 x 75), then cut to it, as A1111's "crop to fit" does.
    batch = a1111.extra_batch_images(
        [picture, picture], upscaler_1=UPSCALER, resize_mode=1, upscaling_resize_w=100, upscaling_resize_h=50
    )
    assert [image.size for image in batch.images] == [(100, 50), (100, 50)]
    uncropped = a1111.extra_single_image(
        picture, upscaler_1=UPSCALER, resize_mode=1, upscaling_resize_w=100, upscaling_resize_h=50, upscaling_crop=False
    )
    assert uncropped.image.size == (100, 75)  # (the covering size, the aspect kept, as A1111 leaves it)
    blended = a1111.extra_single_image(
        picture, upscaler_1=UPSCALER, upscaler_2="Lanczos", extras_upscaler_2_visibility=0.5
    )
    assert blended.image.size == (80, 60)
    with pytest.raises(RuntimeError, match="gfpgan_visibility"):
        a1111.extra_single_image(picture, upscaler_1=UPSCALER, gfpgan_visibility=0.5)

    # A hires fix named as A1111 names it: the model's pixels differ from Lanczos's.
    hires = {"prompt": "a lighthouse", "seed": 4, "width": 64, "height": 64, "steps": 4, "enable_hr": True}
    by_model = a1111.txt2img(**hires, hr_scale=2, hr_upscaler=UPSCALER, denoising_strength=0.5)
    by_lanczos = a1111.txt2img(**hires, hr_scale=2, hr_upscaler="Lanczos", denoising_strength=0.5)
    assert by_model.image.size == (128, 128)
    assert by_model.image.tobytes() != by_lanczos.image.tobytes()
    status = httpx.get(f"{server.url}/v1/system/status", timeout=300).json()
    assert [u["id"] for u in status["upscalers"]] == [UPSCALER]
    (replica,) = httpx.get(f"{server.url}/v1/system/fleet", timeout=300).json()["replicas"]
    assert replica["devices"][0]["side_models"] == [UPSCALER]  # (what the fleet page lists)


def test_a_torchscript_archive_is_refused_before_anything_would_run_it(tmp_path, tiny_upscaler):
    """A `.pt` may be TorchScript: a program `torch.jit.load` runs, not weights. It never gets
    that far; a plain torch.save of the same weights still reads (spandrel's restricted unpickler)."""
    from safetensors.torch import load_file

    from backends.sdxl_backend.models.upscalers import read_upscaler

    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(scripted))
    with pytest.raises(ValueError, match="TorchScript archive"):
        read_upscaler(scripted)
    plain = tmp_path / "plain.pt"
    torch.save({"params_ema": load_file(Path(tiny_upscaler.path) / UPSCALER_FILE)}, plain)
    assert read_upscaler(plain).scale == 4
