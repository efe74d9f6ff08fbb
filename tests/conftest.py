"""Shared fixtures: an isolated BentoML home, the tiny model in its store, served processes.

BENTOML_HOME is set before anything imports bentoml, so no test touches the user's store (and
torch.compile's cache is the session's own, likewise).
Tests that use a served process are marked `served`; `pytest -m "not served"` runs the quick,
in-process part alone.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

BENTOML_HOME = Path(tempfile.mkdtemp(prefix="sdxl-tests-bentoml-"))
os.environ["BENTOML_HOME"] = str(BENTOML_HOME)
os.environ["BENTOML_DO_NOT_TRACK"] = "true"
# torch.compile's kernels in a cache of the session's own: the shared one in /tmp outlives the
# run, and a run stopped while gcc wrote a kernel leaves a truncated .so that the next one loads.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdxl-tests-inductor-")
# On pytest-xdist workers (`make test`), the cores shared among them: torch in each worker and
# in the servers it starts gets its share, as more threads than cores spin and wait on each other.
if (workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))) > 1:
    share = str(max(1, len(os.sched_getaffinity(0)) // workers))
    os.environ.setdefault("OMP_NUM_THREADS", share)
    os.environ.setdefault("SDXL_TORCH_THREADS", share)

from PIL import Image  # noqa: E402

from tests.served import ROOT, RedisServer, Server  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="keep N CPU busy loops running for the whole session (the busy-machine check)",
    )


@pytest.fixture(scope="session", autouse=True)
def busy_machine(request):
    """`--busy N`: the suite shares the machine with N busy loops, as on a loaded CI runner."""
    loops = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(request.config.getoption("--busy"))
    ]
    yield len(loops)
    for loop in loops:
        loop.kill()
        loop.wait()


@pytest.fixture(scope="session")
def tiny_model():
    """tiny-sdxl in the store, imported by the real import code."""
    from models.store import import_tiny, stored_model

    return stored_model("tiny-sdxl") or import_tiny()


@pytest.fixture(scope="session")
def tiny_lora(tiny_model):
    """tiny-sdxl-lora in the store: every server started after this serves it."""
    from models.store import import_tiny, stored_model

    return stored_model("tiny-sdxl-lora") or import_tiny("tiny-sdxl-lora")


@pytest.fixture(scope="session")
def tiny_tcd_lora(tiny_model):
    """tiny-sdxl-tcd-lora in the store: a LoRA whose catalog entry has a sampling profile."""
    from models.store import import_tiny, stored_model

    return stored_model("tiny-sdxl-tcd-lora") or import_tiny("tiny-sdxl-tcd-lora")


@pytest.fixture(scope="session")
def tiny_vpred(tiny_model):
    """tiny-sdxl-vpred in the store: a v-prediction, zero-terminal-SNR twin of tiny-sdxl."""
    from models.store import import_tiny, stored_model

    return stored_model("tiny-sdxl-vpred") or import_tiny("tiny-sdxl-vpred")


@pytest.fixture(scope="session")
def tiny_refiner(tiny_model):
    """tiny-sdxl-refiner in the store."""
    from models.store import import_tiny, stored_model

    return stored_model("tiny-sdxl-refiner") or import_tiny("tiny-sdxl-refiner")


@pytest.fixture(scope="session")
def tiny_controlnet(tiny_model):
    """tiny-sdxl-controlnet in the store: every server started after this serves it."""
    from models.store import import_tiny, stored_model

    return stored_model("tiny-sdxl-controlnet") or import_tiny("tiny-sdxl-controlnet")


@pytest.fixture(scope="session")
def tiny_union_controlnet(tiny_model):
    """tiny-sdxl-controlnet-union in the store: a union ControlNet (8 control types)."""
    from models.store import import_tiny, stored_model

    return stored_model("tiny-sdxl-controlnet-union") or import_tiny("tiny-sdxl-controlnet-union")


@pytest.fixture(scope="session")
def tiny_embedding(tiny_model):
    """tiny-sdxl-embedding in the store: every server started after this serves it."""
    from models.store import import_tiny, stored_model

    return stored_model("tiny-sdxl-embedding") or import_tiny("tiny-sdxl-embedding")


@pytest.fixture(scope="session")
def tiny_upscaler(tiny_model):
    """tiny-upscaler in the store: every server started after this serves it."""
    from models.store import import_tiny, stored_model

    return stored_model("tiny-upscaler") or import_tiny("tiny-upscaler")


HUB_SHA = "0123456789abcdef0123456789abcdef01234567"


def hub_snapshot(tmp_path: Path, repo: str) -> tuple[Path, dict[str, str]]:
    """An empty snapshot of `repo` in a Hugging Face cache under `tmp_path` (its `main` ref
    pointing at it), and the environment that makes huggingface_hub read that cache and nothing
    else: HF_HUB_OFFLINE=1, and HF_ENDPOINT on a closed port, so any request would fail."""
    cache = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = cache / "snapshots" / HUB_SHA
    snapshot.mkdir(parents=True)
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text(HUB_SHA)
    return snapshot, {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}


@pytest.fixture
def cli(tmp_path):
    """`cli(*args, **env)`: `python -m models ARGS` as a user runs it, in a private BentoML home
    (`tmp_path / "bentoml"`)."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}

    def run(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "models", *args],
            cwd=ROOT,
            env={**env, **extra_env},
            capture_output=True,
            text=True,
            timeout=300,
        )

    return run


@pytest.fixture(scope="session")
def tiny_ip_adapter(tiny_model):
    """tiny-sdxl-ip-adapter in the store: every server started after this serves it."""
    from models.store import import_tiny, stored_model

    return stored_model("tiny-sdxl-ip-adapter") or import_tiny("tiny-sdxl-ip-adapter")


class Servers:
    """The one way tests start a served process: `servers(name, env)` returns it ready (its log
    under the test's output folder). Each fixture below stops the ones it started when its scope
    ends, so that a server lives no longer than the tests that use it."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory):
        self.tmp_path_factory = tmp_path_factory
        self.started: list[Server] = []

    def __call__(self, name: str, env: dict[str, str], target: str = "service:SDXL") -> Server:
        folder = self.tmp_path_factory.mktemp(name)
        # Every test server has the park seam (`Server.parked()`): its own file unless the test
        # gives one (replicas that share a queue share it).
        server = Server({"SDXL_TEST_PARK_FILE": str(folder / "park"), **env}, folder / "server.log", target)
        self.started.append(server)
        server.wait_ready()
        return server

    def stop_all(self) -> None:
        for server in self.started:  # all asked to stop first: each takes seconds to shut down
            server.terminate()
        for server in self.started:
            server.stop()


@pytest.fixture
def serve(tiny_model, tmp_path_factory):
    """Servers a test starts for itself: stopped when the test ends."""
    servers = Servers(tmp_path_factory)
    yield servers
    servers.stop_all()


@pytest.fixture(scope="module")
def serve_for_module(tiny_model, tmp_path_factory):
    """Servers of a module's fixtures: stopped when the module's tests end."""
    servers = Servers(tmp_path_factory)
    yield servers
    servers.stop_all()


@pytest.fixture(scope="session")
def serve_for_session(tiny_model, tmp_path_factory):
    """Servers that tests of several modules share (`server`, `jobs_server`...): stopped at the end."""
    servers = Servers(tmp_path_factory)
    yield servers
    servers.stop_all()


@contextlib.contextmanager
def chromium():
    """Headless Chromium (Debian's package, which `make test` installs), driven by Playwright.
    Its sync API keeps an event loop running in this thread while it is open: a test that runs
    a loop of its own (anyio.run) cannot run meanwhile, so a module that has both opens it in
    the test that needs it."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "no Chromium: `make test` installs it (Debian's chromium package)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real Redis on 127.0.0.1, for the replicas that share it."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server(serve_for_session):
    """The service serving tiny-sdxl (also as `sdxl-realism`, the id gallery clients send),
    shared by the HTTP tests; a test that unloads models leaves them loadable."""
    return serve_for_session("server", {"SDXL_MODELS": "tiny-sdxl", "SDXL_MODEL_ALIASES": "sdxl-realism=tiny-sdxl"})


@pytest.fixture(scope="session")
def jobs_server(serve_for_session):
    """A short queue (2 waiting), a 3 s request timeout, finished jobs kept 10 s."""
    return serve_for_session(
        "jobs",
        {"SDXL_MODELS": "tiny-sdxl", "SDXL_MAX_QUEUE": "2", "SDXL_TIMEOUT_SECONDS": "3", "SDXL_JOB_TTL_SECONDS": "10"},
    )


@pytest.fixture(scope="session")
def side_models_server(
    serve_for_session,
    tiny_refiner,
    tiny_vpred,
    tiny_lora,
    tiny_tcd_lora,
    tiny_controlnet,
    tiny_union_controlnet,
    tiny_embedding,
    tiny_ip_adapter,
    tiny_upscaler,
):
    """tiny-sdxl with a model of every other kind beside it, shared by the ComfyUI tests and
    each side model's client tests: its refiner and v-prediction twin (served as models), the
    LoRAs (one with a sampling profile), the ControlNets (plain and union), the embedding, the
    IP-Adapter and the upscaler (in 48-pixel tiles), decoded by a served VAE (what ComfyUI's
    VAELoader lists), with torch on one thread. A test that counts loaded models unloads them
    first."""
    from models.store import import_tiny, stored_model

    stored_model("tiny-sdxl-vae", "vae") or import_tiny("tiny-sdxl-vae")
    return serve_for_session(
        "side-models",
        {
            "SDXL_MODELS": "tiny-sdxl,tiny-sdxl-refiner,tiny-sdxl-vpred",
            "SDXL_VAE": "tiny-sdxl-vae",
            "SDXL_UPSCALE_TILE": "48",
            "SDXL_UPSCALE_TILE_OVERLAP": "8",
            "SDXL_TORCH_THREADS": "1",
        },
    )


# What a tiny side model fits on `side_models_server`: tiny-sdxl and its v-prediction twin (the
# same architecture), never the refiner (another UNet).
FITS_TINY_SDXL = ["tiny-sdxl", "tiny-sdxl-vpred"]

# The keys `guarded` accepts; the first is the one the tests mostly present.
GUARD_KEYS = ("sk-test-7f3a9c1e5b", "other-key", "key-one-0123456789", "key-two-0123456789")


@pytest.fixture(scope="session")
def guarded(serve_for_session, tmp_path_factory):
    """The edge's guards, all switched on: API keys (read from a file; the first an admin's), CORS for one origin,
    image links that expire in 3 s, a 200 kB body limit, room for one event stream; its log
    in JSON lines."""
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("\n".join(GUARD_KEYS) + "\n")
    return serve_for_session(
        "guarded",
        {
            "SDXL_MODELS": "tiny-sdxl",
            "SDXL_MODEL_ALIASES": "sdxl-realism=tiny-sdxl",
            "SDXL_API_KEYS": str(keys),
            "SDXL_ADMIN_KEYS": GUARD_KEYS[0],
            "SDXL_CORS_ORIGINS": "http://gallery.local",
            "SDXL_IMAGE_URL_TTL_SECONDS": "3",
            "SDXL_MAX_BODY_BYTES": "200000",
            "SDXL_MAX_EVENT_STREAMS": "1",
            "SDXL_WARMUP": "false",
            "SDXL_LOG_FORMAT": "json",
        },
    )


@pytest.hookimpl(tryfirst=True)  # (before pytest-xdist's, which reads the groups)
def pytest_collection_modifyitems(items):
    for item in items:
        if any(
            name.startswith("serve") or "server" in name or name in ("guarded", "bento") for name in item.fixturenames
        ):
            item.add_marker(pytest.mark.served)
    for item, group in server_groups(items).items():
        item.add_marker(pytest.mark.xdist_group(group))
    # The tests marked `long` first (the rest in pytest-randomly's order): started last, one of
    # them would keep a worker busy after the other has run out of tests.
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def server_groups(items) -> dict:
    """`make test` runs the suite on three pytest-xdist workers (`--dist loadgroup`), and each
    worker starts its own copy of a shared server its tests use. So the tests that share a
    server (a session one, by its fixture's name, or a module's, by the module's name) are one
    group, run by one worker, and tests that share any server with a group join it."""
    owner: dict[str, str] = {}

    def root(key: str) -> str:
        while owner.setdefault(key, key) != key:
            key = owner[key]
        return key

    shared = {}
    for item in items:
        keys = []
        for name, fixturedefs in item._fixtureinfo.name2fixturedefs.items():
            if "serve_for_session" in fixturedefs[-1].argnames:
                keys.append(name)
            if "serve_for_module" in fixturedefs[-1].argnames:
                keys.append(item.module.__name__)
        if keys:
            shared[item] = keys
            for key in keys[1:]:
                owner[root(key)] = root(keys[0])
    return {item: root(keys[0]) for item, keys in shared.items()}


def image_prompt_slots(url: str, model: str = "tiny-sdxl") -> int:
    """How many IP-Adapters a server serves for `model`: the store is shared, so a server started
    after `tiny_ip_adapter` serves it and one started before does not (pytest-randomly picks)."""
    listed = httpx.get(f"{url}/v1/ip-adapters", timeout=300).json()["data"]
    return sum(model in adapter["fits"] for adapter in listed)


def nothing_loaded(server) -> dict[str, int]:
    """Unloads what a shared server holds (earlier tests' models and side models), so that a
    test can count what it loads itself; returns the server's load counts so far."""
    assert httpx.post(f"{server.url}/v1/system/unload", timeout=300).status_code == 200
    return httpx.get(f"{server.url}/v1/system/status", timeout=300).json()["loads"]


def png_bytes(width: int = 64, height: int = 64, color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(data: bytes) -> bytes:
    return Image.open(io.BytesIO(data)).convert("RGB").tobytes()
