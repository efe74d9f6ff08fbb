"""The MCP server at /mcp (backends/api/agents/), driven by the official `mcp` client over
streamable HTTP against a served instance: tools listed with their schemas, images as links
that fetch and a thumbnail, progress in order, a cancelled call cancelling its job, bad input
as tool errors naming the field, and the API key guarding it all. The second replica's view
of an MCP job is in test_scale_out.py."""

from __future__ import annotations

import base64
import contextlib
import io
import re

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from PIL import Image

from tests.conftest import GUARD_KEYS, png_bytes
from tests.test_jobs import wait

QUICK = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 5}


@contextlib.asynccontextmanager
async def connected(server, key: str | None = None):
    """The official client, on its defaults but for the key (MCP clients send it as a Bearer)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(300)) as http,
        Client(streamable_http_client(f"{server.url}/mcp", http_client=http)) as client,
    ):
        yield client


def run(main):
    return anyio.run(main)


def test_the_tools_are_listed_with_the_native_fields_and_result_schemas(server):
    async def main():
        async with connected(server) as client:
            return {tool.name: tool for tool in (await client.list_tools()).tools}

    tools = run(main)
    assert set(tools) == {
        "generate_image",
        "edit_image",
        "get_job",
        "cancel_job",
        "list_models",
        "list_loras",
        "upscale_image",
        "list_upscalers",
    }
    generate = tools["generate_image"].input_schema
    assert generate["required"] == ["prompt"]
    assert "multiple of 8" in generate["properties"]["width"]["description"]  # the native field's own words
    assert {"image", "mask", "strength"} <= set(tools["edit_image"].input_schema["properties"])
    sampling = {"clip_skip", "guidance_rescale", "pag_scale", "freeu"}  # (the sampling fields, in every dialect)
    assert sampling <= set(generate["properties"]) and sampling <= set(tools["edit_image"].input_schema["properties"])
    for tool in tools.values():
        assert tool.output_schema["type"] == "object" and tool.description
    assert tools["get_job"].annotations.read_only_hint and tools["cancel_job"].annotations.destructive_hint


def test_generate_image_answers_a_link_to_a_png_of_the_asked_size_and_a_thumbnail(server):
    async def main():
        async with connected(server) as client:
            return await client.call_tool("generate_image", {**QUICK, "width": 96, "height": 64})

    result = run(main)
    assert not result.is_error, result.content
    shown = result.structured_content
    assert shown["status"] == "succeeded" and shown["model"] == "tiny-sdxl"
    assert shown["images"][0]["seed"] == 5 and shown["parameters"]["steps"] == 2
    link = next(block for block in result.content if block.type == "resource_link")
    assert link.uri == shown["images"][0]["url"] and link.mime_type == "image/png"
    fetched = httpx.get(link.uri, timeout=30)  # (kept-image links need no key)
    assert fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (96, 64)
    preview = next(block for block in result.content if block.type == "image")
    thumbnail = base64.b64decode(preview.data)
    assert preview.mime_type == "image/png" and len(thumbnail) < 80_000
    assert max(Image.open(io.BytesIO(thumbnail)).size) <= 160


def test_upscale_image_answers_a_link_to_the_larger_png_and_refuses_an_unknown_upscaler(server):
    image = base64.b64encode(png_bytes(40, 30)).decode()

    async def main():
        async with connected(server) as client:
            done = await client.call_tool("upscale_image", {"image": image, "upscaler": "lanczos", "scale": 2})
            refused = await client.call_tool("upscale_image", {"image": image, "upscaler": "x4-nothing"})
            return done, refused, await client.call_tool("list_upscalers", {})

    done, refused, listed = run(main)
    assert not done.is_error, done.content
    shown = done.structured_content
    assert (shown["width"], shown["height"], shown["upscaler"], shown["passes"]) == (80, 60, "lanczos", 0)
    assert Image.open(io.BytesIO(httpx.get(shown["url"], timeout=30).content)).size == (80, 60)
    assert any(block.type == "image" for block in done.content)  # the preview
    assert refused.is_error and "upscaler: unknown upscaler 'x4-nothing'" in refused.content[0].text
    assert listed.structured_content["data"] == httpx.get(f"{server.url}/v1/upscalers", timeout=30).json()["data"]


def test_progress_notifications_arrive_in_order_for_a_20_step_job(server):
    told: list[tuple[float, float | None, str | None]] = []

    async def progress(value, total, message):
        told.append((value, total, message))

    async def main():
        async with connected(server) as client:
            return await client.call_tool("generate_image", {**QUICK, "steps": 20}, progress_callback=progress)

    result = run(main)
    assert result.structured_content["status"] == "succeeded"
    values = [value for value, _, _ in told]
    assert values == sorted(set(values)) and values[-1] == 20  # strictly increasing, to the last step
    assert all(total == 20 for _, total, _ in told)
    assert re.fullmatch(r"step 20 of 20 \(job [\w-]+\)", told[-1][2])


def test_a_cancelled_call_cancels_its_job_and_the_device_serves_on(server):
    first_step = anyio.Event()
    told: list[str] = []

    async def progress(value, total, message):
        told.append(message)
        first_step.set()

    async def main():
        async with connected(server) as client:
            async with anyio.create_task_group() as calls:

                async def long_call():
                    body = {"prompt": "a parked one", "width": 64, "height": 64, "steps": 150}
                    await client.call_tool("generate_image", body, progress_callback=progress)

                calls.start_soon(long_call)
                with anyio.fail_after(300):
                    await first_step.wait()
                calls.cancel_scope.cancel()
            return await client.call_tool("generate_image", QUICK)

    with server.parked():  # (the long call's job is held after its first step)
        after = run(main)
    job_id = re.search(r"\(job ([\w-]+)\)", told[0]).group(1)
    state, seen = wait(server, job_id)
    assert state["status"] == "cancelled" and state["step"] < 150
    assert {each["status"] for each in seen} <= {"running", "cancelled"}
    assert after.structured_content["status"] == "succeeded"


def test_bad_arguments_are_tool_errors_naming_the_field(server):
    async def main():
        async with connected(server) as client:
            return [
                await client.call_tool("generate_image", {**QUICK, "width": 100}),
                await client.call_tool("generate_image", {**QUICK, "width": "wide"}),
                await client.call_tool("generate_image", {"prompt": ""}),
                await client.call_tool("edit_image", {"prompt": "x", "image": "https://example.com/cat.png"}),
                await client.call_tool("get_job", {"job_id": "no-such-job"}),
            ]

    width, typed, empty, elsewhere, unknown = run(main)
    for result in (width, typed, empty, elsewhere, unknown):
        assert result.is_error
    assert width.content[0].text.startswith("width: ") and "multiple of 8" in width.content[0].text
    assert typed.content[0].text.startswith("width: ")
    assert empty.content[0].text.startswith("prompt: ")
    assert elsewhere.content[0].text.startswith("image: only links this server handed out")
    assert "no-such-job" in unknown.content[0].text


def test_edit_image_takes_a_link_this_server_handed_out_or_base64(server):
    async def main():
        async with connected(server) as client:
            made = await client.call_tool("generate_image", QUICK)
            link = made.structured_content["images"][0]["url"]
            edited = await client.call_tool("edit_image", {"prompt": "at night", "image": link, "strength": 0.5})
            masked = await client.call_tool(
                "edit_image",
                {
                    "prompt": "a red door",
                    "image": base64.b64encode(png_bytes(64, 64)).decode(),
                    "mask": base64.b64encode(png_bytes(64, 64, (255, 255, 255))).decode(),
                    "steps": 4,
                },
            )
            return edited, masked

    edited, masked = run(main)
    assert edited.structured_content["status"] == "succeeded", edited.content
    assert edited.structured_content["parameters"]["strength"] == 0.5
    assert masked.structured_content["status"] == "succeeded", masked.content


def test_models_and_loras_are_listed(server):
    async def main():
        async with connected(server) as client:
            return await client.call_tool("list_models", {}), await client.call_tool("list_loras", {})

    models, loras = run(main)
    ids = [entry["id"] for entry in models.structured_content["data"]]
    assert "tiny-sdxl" in ids and "sdxl-realism" in ids
    assert isinstance(loras.structured_content["data"], list)


def test_the_api_key_guards_mcp_and_each_key_sees_only_its_own_jobs(guarded):
    async def refused():
        async with connected(guarded, "wrong-key") as client:
            await client.list_tools()

    with pytest.raises(ExceptionGroup) as refusal:  # (the client says only "Server returned an error response")
        run(refused)
    assert refusal.group_contains(MCPError)
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": meta}}
    accept = {
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/list",
    }
    for key, status in (("wrong-key", 401), (GUARD_KEYS[0], 200)):
        answer = httpx.post(
            f"{guarded.url}/mcp", json=listing, headers={**accept, "authorization": f"Bearer {key}"}, timeout=30
        )
        assert answer.status_code == status, answer.text

    async def main():
        async with connected(guarded, GUARD_KEYS[0]) as owner:
            queued = await owner.call_tool("generate_image", {**QUICK, "wait": False})
        job_id = queued.structured_content["job_id"]
        async with connected(guarded, GUARD_KEYS[1]) as other:
            theirs = await other.call_tool("get_job", {"job_id": job_id})
        async with connected(guarded, GUARD_KEYS[0]) as owner:
            mine = await owner.call_tool("get_job", {"job_id": job_id})
        return queued, theirs, mine

    queued, theirs, mine = run(main)
    assert queued.structured_content["status"] in ("queued", "running", "succeeded")
    assert theirs.is_error and not mine.is_error


def test_get_job_answers_the_same_links_each_time_it_is_asked(server):
    """(Each call used to keep the images again: three calls, three sets of links.)"""

    async def main():
        async with connected(server) as client:
            made = await client.call_tool("generate_image", QUICK)
            job_id = made.structured_content["job_id"]
            return made, [await client.call_tool("get_job", {"job_id": job_id}) for _ in range(3)]

    made, asked = run(main)
    links = [[image["url"] for image in answer.structured_content["images"]] for answer in [made, *asked]]
    assert links[0] and all(each == links[0] for each in links), links
