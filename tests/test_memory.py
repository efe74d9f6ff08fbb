"""The model manager: LRU under a budget, memory modes, out-of-memory recovery, idle unload,
and the GPU benchmark's CPU check. Three tiny models stand in for SDXL models; the
out-of-memory error is made by the engine's documented test seam (SDXL_TEST_FAULT_OOM),
since a CPU cannot run out of CUDA memory."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import webuiapi

from backends.api.composition.settings import SettingsError, load_settings, parse_bytes
from backends.sdxl_backend.device import select_placement
from backends.sdxl_backend.models.manager import ModelManager
from backends.sdxl_backend.models.modes import MemoryPolicy
from backends.sdxl_backend.models.pipelines import weights_bytes
from backends.sdxl_backend.models.records import ModelSource
from tests.polling import poll
from tests.served import ROOT, Server

TRIO = ["tiny-a", "tiny-b", "tiny-c"]


@pytest.fixture(scope="module")
def trio(tiny_model):
    """Three stored models (tiny-sdxl imported under three ids) and a budget that fits two."""
    from models.store import import_from_path, stored_model

    for model_id in TRIO:
        stored_model(model_id) or import_from_path(model_id, Path(tiny_model.path))
    size = weights_bytes(Path(tiny_model.path), torch.float32)
    return {m: Path(stored_model(m).path) for m in TRIO}, int(size * 2.5)


def manager(trio, **policy) -> ModelManager:
    paths, budget = trio
    sources = [ModelSource(m, path) for m, path in paths.items()]
    return ModelManager(sources, select_placement(), policy=MemoryPolicy(budget=budget, **policy))


def visit(models: ModelManager, model_id: str) -> None:
    with models.use(model_id, "high", 64 * 64):
        pass


def test_lru_loads_each_model_only_as_often_as_the_budget_demands(trio):
    models = manager(trio)
    for model_id in ["tiny-a", "tiny-b", "tiny-a", "tiny-c", "tiny-a", "tiny-b", "tiny-a"]:
        visit(models, model_id)
    # a, b | a hit | c evicts b (a is more recent) | a hit | b evicts c | a hit
    assert models.loads == {"tiny-a": 1, "tiny-b": 2, "tiny-c": 1}
    assert [m["id"] for m in models.status()["loaded"]] == ["tiny-a", "tiny-b"]


def test_a_model_in_use_is_never_evicted(trio):
    models = manager(trio)
    visit(models, "tiny-b")
    holding, release = threading.Event(), threading.Event()

    def hold_a() -> None:
        with models.use("tiny-a", "high", 64 * 64):
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold_a)
    holder.start()
    holding.wait(30)
    visit(models, "tiny-c")  # a (in use) and b are loaded; b, the only one free, goes
    loaded = {m["id"]: m for m in models.status()["loaded"]}
    assert set(loaded) == {"tiny-a", "tiny-c"} and loaded["tiny-a"]["in_use"]
    visit(models, "tiny-b")  # c goes, a stays
    assert {m["id"] for m in models.status()["loaded"]} == {"tiny-a", "tiny-b"}
    assert models.unload(["tiny-a"]) == []  # in use: not freed
    release.set()
    holder.join()
    assert models.unload() == ["tiny-a", "tiny-b"]


def test_memory_modes_are_applied_and_large_images_decode_tiled(trio):
    models = manager(trio, tiling_pixels=128 * 128)
    with models.use("tiny-a", "balanced", 64 * 64) as (pipelines, _):
        assert pipelines.mode == "balanced" and pipelines.owner.vae.use_tiling
    with models.use("tiny-a", "high", 64 * 64) as (pipelines, _):
        assert pipelines.mode == "high" and not pipelines.owner.vae.use_tiling
    with models.use("tiny-a", "high", 256 * 256) as (pipelines, _):
        assert pipelines.owner.vae.use_tiling  # above the pixel threshold, in every mode
    assert not pipelines.owner.vae.use_tiling


def test_sizes_and_policy_from_environment(monkeypatch):
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("500MB") == 500 * 10**6
    assert parse_bytes("1073741824") == 2**30 and parse_bytes("1.5g") == int(1.5 * 2**30)
    with pytest.raises(ValueError, match="not a size: 'lots'"):
        parse_bytes("lots")
    monkeypatch.setenv("SDXL_MEMORY_BUDGET", "3GiB")
    monkeypatch.setenv("SDXL_VRAM_MODE", "balanced")
    monkeypatch.setenv("SDXL_IDLE_UNLOAD_SECONDS", "30")
    assert load_settings().memory_policy == MemoryPolicy(budget=3 * 2**30, default_mode="balanced", idle_unload_s=30)
    monkeypatch.setenv("SDXL_VRAM_MODE", "turbo")
    with pytest.raises(SettingsError, match="SDXL_VRAM_MODE='turbo'"):
        load_settings()


# --- through a served process -------------------------------------------------------------


def generate(server: Server, model: str, **extra) -> httpx.Response:
    body = {"prompt": "x", "model": model, "width": 64, "height": 64, "steps": 2, **extra.pop("body", {})}
    return httpx.post(f"{server.url}/v1/generate", json=body, timeout=300, **extra)


def status(server: Server) -> dict:
    return httpx.get(f"{server.url}/v1/system/status", timeout=300).json()


@pytest.fixture(scope="module")
def trio_server(trio, serve_for_module):
    _, budget = trio
    return serve_for_module(
        "trio", {"SDXL_MODELS": ",".join(TRIO), "SDXL_MEMORY_BUDGET": str(budget), "SDXL_IDLE_UNLOAD_SECONDS": "20"}
    )


def test_served_lru_concurrent_requests_and_status(trio_server):
    # From nothing loaded (whatever the module's other tests left), a budget that fits two:
    assert httpx.post(f"{trio_server.url}/v1/system/unload", timeout=300).status_code == 200
    before = status(trio_server)["loads"]
    sequence = ["tiny-a", "tiny-b", "tiny-a", "tiny-c", "tiny-a", "tiny-b", "tiny-a"]
    for model_id in sequence:
        assert generate(trio_server, model_id).status_code == 200
    state = status(trio_server)
    loads = {m: state["loads"].get(m, 0) - before.get(m, 0) for m in TRIO}
    assert loads == {"tiny-a": 1, "tiny-b": 2, "tiny-c": 1}  # c evicts b (a was used since), then b evicts c
    assert [m["id"] for m in state["loaded"]] == ["tiny-a", "tiny-b"]
    assert state["memory"]["models"] <= state["memory"]["budget"] == int(state["memory"]["budget"])
    placement = select_placement()  # what the server chose too (cpu and float32 here; cuda and float16 on a GPU)
    assert (state["device"], state["dtype"]) == (str(placement.device), str(placement.dtype).removeprefix("torch."))
    assert state["queue_length"] == 0

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda m: generate(trio_server, m), ["tiny-a", "tiny-b", "tiny-c"] * 4))
    assert all(a.status_code == 200 for a in answers)
    assert [a.json()["stats"]["model"] for a in answers] == ["tiny-a", "tiny-b", "tiny-c"] * 4
    state = status(trio_server)
    assert len(state["loaded"]) == 2 and not any(m["in_use"] for m in state["loaded"])
    listed = {m["id"]: m["loaded"] for m in httpx.get(f"{trio_server.url}/v1/models", timeout=300).json()["models"]}
    assert listed == {m: m in {x["id"] for x in state["loaded"]} for m in TRIO}


def test_idle_unload_fires(trio_server):
    assert generate(trio_server, "tiny-a").status_code == 200
    assert status(trio_server)["loaded"]
    assert poll(lambda: status(trio_server)["loaded"], lambda loaded: loaded == [], 300, 0.5, "the idle unload") == []
    assert "idle for" in trio_server.log()


def test_low_mode_frees_the_model_and_status_shows_modes(trio_server):
    generate(trio_server, "tiny-b", body={}, headers={"X-VRAM-Mode": "balanced"})
    assert {m["id"]: m["mode"] for m in status(trio_server)["loaded"]}["tiny-b"] == "balanced"
    low = httpx.post(
        f"{trio_server.url}/v1/txt2img",
        timeout=300,
        json={"prompt": "x", "model": "tiny-c", "steps": 2, "vram_mode": "low"},
    )
    assert low.status_code == 200 and low.json()["vram_mode"] == "low"
    assert "tiny-c" not in {m["id"] for m in status(trio_server)["loaded"]}


def test_webuiapi_set_options_switches_the_callers_default_model(trio_server):
    api = webuiapi.WebUIApi(baseurl=f"{trio_server.url}/sdapi/v1", steps=2)
    assert api.util_get_current_model() == "tiny-a"
    try:
        api.util_set_model("tiny-b")  # POST /sdapi/v1/options {"sd_model_checkpoint": ...}
        assert api.util_get_current_model() == "tiny-b"
        assert api.txt2img(prompt="x", width=64, height=64).info["sd_model_name"] == "tiny-b"
        native = httpx.post(f"{trio_server.url}/v1/txt2img", json={"prompt": "x", "steps": 2}, timeout=300)
        assert native.json()["model"] == "tiny-b"  # the caller's default in every dialect (no keys: one caller)
        assert httpx.get(f"{trio_server.url}/health", timeout=300).json()["default_model"] == "tiny-a"  # the server's
    finally:
        api.set_options({"sd_model_checkpoint": "tiny-a"})


def test_out_of_memory_is_recovered_in_the_next_lower_mode(serve):
    server = serve("oom1", {"SDXL_MODELS": "tiny-sdxl", "SDXL_TEST_FAULT_OOM": "1@2"})
    try:
        answer = generate(server, "tiny-sdxl")
        assert answer.status_code == 200, answer.text
        assert answer.json()["stats"]["vram_mode"] == "balanced"
        assert answer.json()["stats"]["out_of_memory_in"] == ["high"]
        assert answer.headers["X-VRAM-Mode"] == "balanced"
        native = httpx.post(f"{server.url}/v1/txt2img", json={"prompt": "x", "steps": 2}, timeout=300).json()
        assert (native["vram_mode"], native["out_of_memory_in"]) == ("balanced", ["high"])
        from_low = httpx.post(
            f"{server.url}/v1/txt2img", json={"prompt": "x", "steps": 2, "vram_mode": "low"}, timeout=300
        )  # nothing lower to try
        assert from_low.status_code == 507
        assert "tried memory modes low" in from_low.json()["error"]["message"]
        # moondream-station's answer on its route: a 500 saying "CUDA out of memory", on which
        # the gallery retries in low-memory mode.
        gallery = generate(server, "tiny-sdxl", headers={"X-VRAM-Mode": "low"})
        assert gallery.status_code == 500 and "CUDA out of memory" in gallery.text
    finally:
        server.stop()


@pytest.mark.long
def test_out_of_memory_twice_is_507_and_memory_returns_to_its_level(serve):
    server = serve("oom2", {"SDXL_MODELS": "tiny-sdxl", "SDXL_TEST_FAULT_OOM": "2@3", "SDXL_WARMUP": "0"})
    body = {"prompt": "x", "width": 1024, "height": 1024, "steps": 4, "n": 2}

    def generate(server, model, body):  # the native route, whose out-of-memory answer is 507
        return httpx.post(f"{server.url}/v1/txt2img", json={**body, "model": model}, timeout=300)

    try:
        # The first request also pays the process's one-time growth (lazy imports, kernel and
        # allocator caches); what must not grow is the memory each failed request leaves.
        assert generate(server, "tiny-sdxl", body).status_code == 507
        before = status(server)["memory"]["process_rss"]
        for _ in range(3):
            failed = generate(server, "tiny-sdxl", body)
            assert failed.status_code == 507
            error = failed.json()["error"]
            assert "out of memory" in error["message"] and "tried memory modes high, balanced" in error["message"]
            assert error["type"] == "out_of_memory"
        after = status(server)
        assert after["loaded"] == []
        assert after["memory"]["process_rss"] - before < 48 * 2**20, (before, after["memory"]["process_rss"])
        assert httpx.get(f"{server.url}/health", timeout=300).json()["status"] == "ok"  # the device thread lives on
        # ... and serves the next request (2 steps: short of the seam's step 3)
        assert generate(server, "tiny-sdxl", {"prompt": "x", "steps": 2}).status_code == 200
    finally:
        server.stop()


@pytest.mark.long
def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    settings = "plain,eager-attention,fuse-qkv,channels-last,int8,fp16-no-upcast-vae"  # (compile: minutes on a CPU)
    run = subprocess.run(
        [
            sys.executable,
            "bench/gpu_sdxl.py",
            "--tiny",
            "--runs",
            "1",
            "--steps",
            "4",
            "--out",
            str(out),
            "--fast-paths",
            settings,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"high", "balanced", "low"} and report["skipped"] == []
    assert report["baseline"]["batch1_p50_s"] > 0 and report["baseline"]["batch4_images_per_s"] > 0
    assert report["load_s"] > 0
    assert len(report["throughput"]) == 6
    assert set(report["controlnets"]) == {"1", "2"} and report["controlnets"]["1"]["p50_s"] > 0
    assert list(report["fast_paths"]) == settings.split(",")
    assert all("error" not in figures and figures["batch1_p50_s"] > 0 for figures in report["fast_paths"].values())
    tables = out.with_suffix(".md").read_text()
    assert "| service, memory mode high |" in tables and "| fuse-qkv |" in tables and tables.strip() in run.stdout


def test_gpu_benchmark_keeps_to_its_time_budget_and_says_what_it_left_out(tmp_path):
    """A lease is short: past the budget, the parts not yet started are listed, not run."""
    out = tmp_path / "gpu.json"
    run = subprocess.run(
        [
            sys.executable,
            "bench/gpu_sdxl.py",
            "--tiny",
            "--runs",
            "1",
            "--steps",
            "2",
            "--out",
            str(out),
            "--budget-s",
            "0.01",
            "--fast-paths",
            "plain,fuse-qkv",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["baseline"]["batch1_p50_s"] > 0  # always measured: every estimate is made from it
    assert report["modes"] == report["fast_paths"] == report["throughput"] == report["controlnets"] == {}
    assert report["skipped"][:4] == ["mode high", "mode balanced", "setting plain", "setting fuse-qkv"]
    assert "Left out to stay within the time budget: mode high" in out.with_suffix(".md").read_text()
