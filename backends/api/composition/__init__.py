"""The composition: what the routes reach and how it is built at start. `settings` (every
`SDXL_*` variable, read once), `served` (what the store holds), `devices` (a thread, models and
an engine per device), `shared_redis` and `caller_options` (the stores the replicas share),
`runtime` (the one object the routes use) and `app` (the dialects' routers as one app)."""
