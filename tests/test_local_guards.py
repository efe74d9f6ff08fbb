"""A server on the user's own machine that web pages cannot drive (backends/api/edge/guards.py):
the attacks tried as a page would make them, against a served instance on its defaults; a
local gallery still served; `*` settings restoring the old reach."""

from __future__ import annotations

import httpx
import pytest

from backends.api.edge.guards import LOCAL_ORIGINS, Origins, host_allowed

EVIL = "https://evil.example"
LOCAL_GALLERY = "http://localhost:5173"  # a gallery's dev server on the same machine


def port_of(server) -> str:
    return server.url.rsplit(":", 1)[1]


def test_a_rebound_name_is_not_served(server):
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/system/unload"), ("GET", "/v1/jobs")):
        answer = httpx.request(method, f"{server.url}{path}", headers={"Host": f"evil.example:{port_of(server)}"})
        assert answer.status_code == 421, path
        assert "SDXL_ALLOWED_HOSTS" in answer.json()["error"]["message"]
    for host in (f"localhost:{port_of(server)}", f"127.0.0.1:{port_of(server)}"):
        assert httpx.get(f"{server.url}/v1/models", headers={"Host": host}, timeout=300).status_code == 200


def test_a_cross_site_simple_request_cannot_act(server):
    unload = httpx.post(f"{server.url}/v1/system/unload", headers={"Origin": EVIL}, timeout=300)  # no body
    assert unload.status_code == 403 and "SDXL_CORS_ORIGINS" in unload.json()["error"]["message"]
    assert "access-control-allow-origin" not in unload.headers
    job = httpx.post(
        f"{server.url}/v1/jobs",
        content='{"prompt": "x"}',
        headers={"Origin": EVIL, "Content-Type": "text/plain"},
        timeout=300,
    )
    assert job.status_code == 403
    form = httpx.post(f"{server.url}/v1/images/edits", data={"prompt": "x"}, headers={"Origin": EVIL}, timeout=300)
    assert form.status_code == 403
    read = httpx.get(f"{server.url}/v1/models", headers={"Origin": EVIL}, timeout=300)
    assert read.status_code == 200 and "access-control-allow-origin" not in read.headers  # the page cannot read it


def test_a_gallery_on_a_local_origin_is_still_served(server):
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 2}
    answer = httpx.post(f"{server.url}/v1/generate", json=body, headers={"Origin": LOCAL_GALLERY}, timeout=300)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == LOCAL_GALLERY
    own_page = httpx.post(
        f"{server.url}/v1/generate", json=body, headers={"Origin": server.url}, timeout=300
    )  # the playground, served by the server itself
    assert own_page.status_code == 200
    preflight = httpx.options(
        f"{server.url}/v1/generate",
        headers={
            "Origin": LOCAL_GALLERY,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
            "Access-Control-Request-Private-Network": "true",
        },
        timeout=300,
    )
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == LOCAL_GALLERY
    assert preflight.headers["access-control-allow-private-network"] == "true"
    stranger = httpx.options(
        f"{server.url}/v1/generate",
        headers={
            "Origin": EVIL,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Private-Network": "true",
        },
        timeout=300,
    )
    assert "access-control-allow-private-network" not in stranger.headers
    assert "access-control-allow-origin" not in stranger.headers


@pytest.fixture(scope="module")
def open_to_all(serve_for_module):
    return serve_for_module(
        "open-to-all",
        {"SDXL_MODELS": "tiny-sdxl", "SDXL_WARMUP": "0", "SDXL_CORS_ORIGINS": "*", "SDXL_ALLOWED_HOSTS": "*"},
    )


def test_star_settings_restore_the_old_reach(open_to_all):
    host = {"Host": f"evil.example:{port_of(open_to_all)}"}
    assert httpx.get(f"{open_to_all.url}/v1/models", headers=host, timeout=300).status_code == 200
    unload = httpx.post(f"{open_to_all.url}/v1/system/unload", headers={"Origin": EVIL}, timeout=300)
    assert unload.status_code == 200 and unload.headers["access-control-allow-origin"] == "*"


def test_origin_patterns_and_host_names():
    local = Origins(LOCAL_ORIGINS)
    assert all(local.allows(o) for o in ("http://localhost", "http://localhost:8080", "http://[::1]:3000"))
    assert not any(
        local.allows(o)
        for o in ("https://localhost:8080", "http://localhost.evil.example", "http://localhost:1x", EVIL)
    )
    assert host_allowed("10.1.2.3:3000", []) and host_allowed("[::1]:3000", []) and host_allowed("LOCALHOST", [])
    assert not host_allowed("gpu-box:3000", []) and host_allowed("gpu-box:3000", ["gpu-box"])
    assert host_allowed("anything.example", ["*"])
