"""The HTTP side, by concern:
- the dialects, a package each (its wire models, its router, its shaping): `native`, `a1111`,
  `images` (OpenAI and moondream-station), `comfyui` and `agents` (MCP); `jobs` is the jobs
  dialect with the answers every dialect shares;
- `edge`: what runs before and around every route (keys, guards, headers, errors, hang-ups);
- `operations`: health, the fleet, metrics, traces, logs;
- `composition`: the settings, the stores, the devices and the runtime the routes reach.

Only the native API's methods are in service.py, as BentoML API methods."""
