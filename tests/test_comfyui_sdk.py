"""@saintno/comfyui-sdk (npm, the package LobeHub's ComfyUI provider is built on), run by Node on
its defaults (tests/comfyui_sdk/run.mjs: ComfyApi, PromptBuilder and CallWrapper as its README
shows) against a served instance: txt2img with its progress events, img2img through its upload,
the hires fix, and an interrupt that stops a parked prompt."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.comfyui_workflows import hires_fix, img2img, txt2img

SDK = Path(__file__).parent / "comfyui_sdk"


@pytest.fixture
def server(side_models_server):
    assert shutil.which("node") and (SDK / "node_modules").is_dir(), "make test-programs installs Node and the SDK"
    return side_models_server


def run_sdk(server, request: dict) -> list[dict]:
    """The events the SDK reported, in order (one JSON object per line of run.mjs)."""
    done = subprocess.run(
        ["node", "run.mjs", server.url, json.dumps(request)], cwd=SDK, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def image_at(url: str) -> Image.Image:
    answer = httpx.get(url, timeout=60)
    assert answer.status_code == 200, answer.text
    return Image.open(io.BytesIO(answer.content))


def inputs(**paths_and_values) -> dict:
    return {key: {"path": path, "value": value} for key, (path, value) in paths_and_values.items()}


def test_the_sdk_runs_txt2img_with_progress_and_the_hires_fix(server):
    request = {
        "workflow": txt2img("placeholder", steps=4),
        "inputs": inputs(
            positive=("6.inputs.text", "a lighthouse"),
            seed=("3.inputs.seed", 9),
            width=("5.inputs.width", 96),
            height=("5.inputs.height", 64),
        ),
        "output": "9",
    }
    events = run_sdk(server, request)
    kinds = [event["event"] for event in events]
    assert kinds[0] == "pending" and kinds[-1] == "finished", events
    progress = [event for event in events if event["event"] == "progress"]
    assert progress and progress[-1]["max"] == 4 and {event["node"] for event in progress} == {"3"}
    (url,) = events[-1]["images"]
    assert image_at(url).size == (96, 64)

    hires = run_sdk(server, {"workflow": hires_fix("a castle", scale=2.0), "inputs": {}, "output": "9"})
    assert hires[-1]["event"] == "finished", hires
    assert image_at(hires[-1]["images"][0]).size == (128, 128)


def test_the_sdk_uploads_an_image_and_runs_img2img(server, tmp_path):
    picture = tmp_path / "in.png"
    Image.new("RGB", (64, 96), (20, 160, 90)).save(picture)
    request = {
        "workflow": img2img("an oil painting", "UPLOADED"),
        "inputs": {},
        "output": "9",
        "upload": {"path": str(picture), "placeholder": "UPLOADED"},
    }
    events = run_sdk(server, request)
    assert events[-1]["event"] == "finished", events
    assert image_at(events[-1]["images"][0]).size == (64, 96)


def test_the_sdks_interrupt_stops_a_parked_prompt(server):
    with server.parked():
        events = run_sdk(
            server, {"workflow": txt2img("park here", steps=6), "inputs": {}, "output": "9", "interrupt": True}
        )
    failed = [event for event in events if event["event"] == "failed"]
    assert failed and failed[0]["name"] == "ExecutionInterruptedError", events
    assert "finished" not in [event["event"] for event in events]
