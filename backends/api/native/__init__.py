"""The house's own dialect: `generation` (`/v1/txt2img` and `/v1/img2img`, BentoML API methods
in service.py), `upscale` (`/v1/upscale`), `openapi` (`/docs.json`, made to say what the server
sends) and `playground` (the page at `/ui`, a client of the public API)."""
