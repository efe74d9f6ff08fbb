"""A ComfyUI prompt's job, in ComfyUI's shapes: its entry in `/queue` and `/history`, its output
images' names for `/view`, and the socket events that tell its life (socket.py sends them)."""

from __future__ import annotations

import time
from typing import Any

from backends.api.comfyui.nodes import NODES, object_info
from backends.api.comfyui.records import PromptRecord
from backends.sdxl_backend.jobs import Job, JobStatus


def image_refs(job: Job, record: PromptRecord, image_type: str) -> list[dict[str, str]]:
    """The job's images as ComfyUI names them: `<prompt id>_<index>.<ext>`, served by `/view`."""
    return [
        {"filename": f"{job.id}_{index}.{record.extension}", "subfolder": "", "type": image_type}
        for index in range(record.images)
    ]


def outputs(job: Job, record: PromptRecord) -> dict[str, dict[str, Any]]:
    if job.status != JobStatus.SUCCEEDED:
        return {}
    return {node: {"images": image_refs(job, record, image_type)} for node, image_type in record.outputs.items()}


def queue_item(job: Job, record: PromptRecord) -> list[Any]:
    """[number, prompt id, workflow, extra data, output node ids], as ComfyUI lists a prompt."""
    return [record.number, job.id, record.workflow, record.extra_data, list(record.outputs)]


def _millis(seconds: float | None) -> int:
    return int((seconds or time.time()) * 1000)


def history_entry(job: Job, record: PromptRecord) -> dict[str, Any]:
    """A finished prompt in `/history`: its outputs, and how it ended with the events that told it."""
    succeeded = job.status == JobStatus.SUCCEEDED
    messages = [["execution_start", {"prompt_id": job.id, "timestamp": _millis(job.started or job.created)}]]
    messages += [[event, data] for event, data in final_events(job, record)[:-1] if event != "executed"]
    return {
        "prompt": queue_item(job, record),
        "outputs": outputs(job, record),
        "status": {"status_str": "success" if succeeded else "error", "completed": succeeded, "messages": messages},
        "meta": {
            node: {"node_id": node, "display_node": node, "parent_node": None, "real_node_id": node}
            for node in record.outputs
        },
    }


def started_events(job: Job, record: PromptRecord) -> list[tuple[str, dict[str, Any]]]:
    """A prompt taken by a device: ComfyUI's start, nothing cached, the nodes before the sampler."""
    at = _millis(job.started)
    events: list[tuple[str, dict[str, Any]]] = [
        ("execution_start", {"prompt_id": job.id, "timestamp": at}),
        ("execution_cached", {"nodes": [], "prompt_id": job.id, "timestamp": at}),
    ]
    for node in record.executed[: record.executed.index(record.sampler) + 1]:
        events.append(("executing", {"node": node, "display_node": node, "prompt_id": job.id}))
    return events


def progress_event(job: Job, record: PromptRecord) -> tuple[str, dict[str, Any]]:
    return (
        "progress",
        {"value": job.step, "max": job.total_steps, "prompt_id": job.id, "node": record.sampler},
    )


def final_events(job: Job, record: PromptRecord) -> list[tuple[str, dict[str, Any]]]:
    """A finished prompt: the nodes after the sampler and each output's images, then success;
    or the error, or the interruption (a cancel); then `executing` with no node, its end."""
    at = _millis(job.finished)
    sampler = record.sampler
    events: list[tuple[str, dict[str, Any]]] = []
    if job.status == JobStatus.SUCCEEDED:
        for node in record.executed[record.executed.index(sampler) + 1 :]:
            events.append(("executing", {"node": node, "display_node": node, "prompt_id": job.id}))
            if node in record.outputs:
                output = {"images": image_refs(job, record, record.outputs[node])}
                events.append(("executed", {"node": node, "display_node": node, "output": output, "prompt_id": job.id}))
        events.append(("execution_success", {"prompt_id": job.id, "timestamp": at}))
    elif job.status == JobStatus.CANCELLED:
        events.append(
            (
                "execution_interrupted",
                {"prompt_id": job.id, "node_id": sampler, "node_type": "KSampler", "executed": [], "timestamp": at},
            )
        )
    else:
        message = job.error.message if job.error else "the generation failed"
        events.append(
            (
                "execution_error",
                {
                    "prompt_id": job.id,
                    "node_id": sampler,
                    "node_type": "KSampler",
                    "executed": [],
                    "exception_message": message,
                    "exception_type": type(job.error).__name__ if job.error else "BackendError",
                    "traceback": [],
                    "current_inputs": {},
                    "current_outputs": {},
                    "timestamp": at,
                },
            )
        )
    events.append(("executing", {"node": None, "display_node": None, "prompt_id": job.id}))
    return events


def catalog(lists: dict[str, list[str]], name: str | None = None) -> dict[str, Any]:
    """`/object_info`: every node (or the one named), with the server's lists."""
    names = [name] if name is not None else list(NODES)
    return {node: object_info(node, NODES[node], lists) for node in names if node in NODES}
