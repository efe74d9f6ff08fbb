"""The playground: one page at `/ui` (playground.html) to try the server in a browser. It is a
client of the public API like any other (jobs and their event stream, the listings), served
without a key (it holds none: a key typed into it stays in the browser) and with a content
policy that lets it reach this server only."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PAGE = Path(__file__).with_name("playground.html")
# Scripts and styles are inline (one file, no build step); images are data: URLs; every
# request goes to this origin.
POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

router = APIRouter(tags=["playground"])


@router.get("/ui", response_class=HTMLResponse, responses={200: {"content": {"text/html": {}}}})
async def playground() -> HTMLResponse:
    """The playground page: generate, watch, compare, in a browser."""
    return HTMLResponse(PAGE.read_text(), headers={"Content-Security-Policy": POLICY, "Cache-Control": "no-cache"})
