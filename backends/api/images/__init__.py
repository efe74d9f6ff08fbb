"""The image routes: moondream-station's `POST /v1/generate` (moondream.py) and the OpenAI Images
API (openai.py: `/v1/images/generations`, multipart `/edits` and `/variations`, and the links
that `response_format: "url"` hands out).

Two kinds of client send to these routes: moondream-station style clients (the gallery
frontend) and OpenAI Images API clients (the `openai` package). One request model takes the
union of their fields and one answer carries the union of their response keys; each client
reads its own keys and ignores the rest. Every accepted field is used, except OpenAI's
`quality`, `style`, `user`, `safety_identifier` and `moderation`, which have no SDXL meaning:
they are accepted so OpenAI clients work, and recorded in `stats`.

Each route is as lenient as the server it imitates. `/v1/generate` is moondream-station's: it
takes the fork's scheduler names (a name it cannot map falls back to the model's default),
accepts fields it does not know, and answers a final out-of-memory with the fork's 500
"CUDA out of memory" (the gallery retries in low-memory mode on exactly that); what it did
not use is listed in `stats.ignored`. `/v1/images/generations` is OpenAI's: an unknown
parameter is a 400, and out-of-memory is 507.

The package: protocol.py (the shared request and answer), serving.py (the generation and the
answer in both shapes), moondream.py and openai.py (each dialect's routes).
"""

from backends.api.images import moondream, openai

routers = [moondream.router, openai.router]

__all__ = ["routers"]
