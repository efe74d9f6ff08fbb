"""The playground: one page at `/ui` (playground.html) to try the server in a browser. It is a
client of the public API like any other (jobs and their event stream, the listings), served
without a key (it holds none: a key typed into it stays in the browser) and with a content
policy that lets it reach this server only."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PAGE = Path(__file__).with_name("playground.html")
# Each page is one file with its script and styles inline (no build step). Its script runs by
# its hash, so no other script does: not one injected into the page, nor an inline handler.
# Images are data: URLs; every request goes to this origin.
POLICY = (
    "default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def page(path: Path) -> HTMLResponse:
    """A page of the server's, with the content policy that lets its own script alone run."""
    html = path.read_text()
    hashes = [base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() for script in SCRIPT.findall(html)]
    policy = POLICY.format(scripts=" ".join(f"'sha256-{digest}'" for digest in hashes) or "'none'")
    return HTMLResponse(html, headers={"Content-Security-Policy": policy, "Cache-Control": "no-cache"})


router = APIRouter(tags=["playground"])


@router.get("/ui", response_class=HTMLResponse, responses={200: {"content": {"text/html": {}}}})
async def playground() -> HTMLResponse:
    """The playground page: generate, watch, compare, in a browser."""
    return page(PAGE)
