"""The ComfyUI dialect: ComfyUI's API (`/prompt`, `/queue`, `/history`, `/view`, `/upload/...`,
`/object_info`, the `/ws` socket), at the root and under `/api`, for the clients written for it
(Open WebUI's ComfyUI engine, SillyTavern's `comfy` source, comfyui-sdk, comfy-api-simplified).

A workflow in ComfyUI's API format is checked as ComfyUI checks it, then recognised, never
interpreted: the wirings of the core SDXL nodes become one `GenerationRequest`, queued as a job
like any other (fair shares, batching, several GPUs, replicas behind Redis, /v1/jobs, the fleet
page). What cannot be run exactly is refused with ComfyUI's `node_errors`.

The package: nodes.py (the nodes, as /object_info shows them), graph.py (the checks and their
400s), plan.py (a workflow's `GenerationRequest`), records.py (what a prompt adds to its job),
answers.py (ComfyUI's shapes), routes.py (the HTTP routes), socket.py (the WebSocket).
"""
