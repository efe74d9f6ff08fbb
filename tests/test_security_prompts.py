"""Security: a prompt's work is bounded and its syntax never a 500, on every dialect of a served
instance (native, A1111, OpenAI, MCP): a bad weight and a prompt over the chunk limit are a
400 (MCP: a tool error) naming the field, and the server serves on."""

from __future__ import annotations

import anyio
import httpx
import pytest

from tests.test_mcp import connected

BAD = ["(a:.)", "(a:1.2.3)", "((a:..))", "(a:1e12)", "(a:nan)", " BREAK ".join(["a"] * 21)]


@pytest.mark.parametrize("prompt", BAD)
def test_every_dialect_refuses_the_prompt_by_name(server, prompt):
    small = {"width": 64, "height": 64, "steps": 1}
    for route, body in (
        ("/v1/txt2img", {"prompt": prompt, **small}),
        ("/v1/jobs", {"prompt": prompt, **small}),
        ("/sdapi/v1/txt2img", {"prompt": prompt, **small}),
        ("/v1/images/generations", {"prompt": prompt, "size": "64x64", "steps": 1}),
    ):
        answer = httpx.post(f"{server.url}{route}", json=body, timeout=300)
        assert answer.status_code == 400, (route, answer.text)
        assert answer.json()["error"]["param"] == "prompt", (route, answer.text)

    async def mcp():
        async with connected(server) as client:
            return await client.call_tool("generate_image", {"prompt": prompt, **small})

    refused = anyio.run(mcp)
    assert refused.is_error and "prompt:" in refused.content[0].text
    assert httpx.post(f"{server.url}/v1/txt2img", json={"prompt": "a fox", **small}, timeout=300).status_code == 200
