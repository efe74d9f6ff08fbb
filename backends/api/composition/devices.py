"""The server's devices (SDXL_DEVICES): for each, the thread that owns it, its loaded models
with their memory budget, and its engine. One queue feeds them all (a device worker each:
jobs/worker.py); what one device loads, the others do not share.

A device's name is what jobs, status and metrics report: torch's ("cuda:1", "cpu"), with
"#index" when one device is listed twice (`cpu,cpu`: two shares of the CPU, each held to its
share of the cores)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from backends.sdxl_backend.device_thread import TORCH_WORK, DeviceThread, usable_cores
from backends.sdxl_backend.jobs.worker import Device, ParkSeam
from backends.sdxl_backend.protocol import GenerationRequest

if TYPE_CHECKING:
    from backends.api.composition.served import ServedModel, SideModels
    from backends.api.composition.settings import Settings
    from backends.sdxl_backend.device import Placement
    from backends.sdxl_backend.generation.engine import Engine
    from backends.sdxl_backend.jobs import Job

logger = logging.getLogger(__name__)


class DeviceLost(BaseException):
    """Test seam (SDXL_TEST_FAULT_DEVICE): the device is gone, as a GPU that fell off its bus;
    not an error of a job, so it ends the device's worker (which fails the jobs it held)."""


def device_list(devices: list[str], device: str) -> list[str]:
    """SDXL_DEVICES as torch devices: "all" is every CUDA device, else every Intel one (or the
    one device found: Apple's GPU, the CPU); unset, SDXL_DEVICE alone."""
    from backends.sdxl_backend.device import device_count

    if devices == ["all"]:
        family = next((family for family in ("cuda", "xpu") if device_count(family)), None)
        return [f"{family}:{index}" for index in range(device_count(family))] if family else [device]
    return devices or [device]


def placements_of(settings: Settings) -> list[Placement]:
    """SDXL_DEVICES (else SDXL_DEVICE) as placements; a device that is not there is a
    RuntimeError naming the setting (service.py asks at its start, so the server stops)."""
    from backends.sdxl_backend.device import select_placement

    setting = "SDXL_DEVICES" if settings.devices else "SDXL_DEVICE"
    try:
        return [select_placement(name, settings.dtype) for name in device_list(settings.devices, settings.device)]
    except ValueError as exc:
        raise RuntimeError(f"{setting}: {exc}") from None


def device_names(placements: list[str]) -> list[str]:
    repeated = {name for name, count in Counter(placements).items() if count > 1}
    return [f"{name}#{index}" if name in repeated else name for index, name in enumerate(placements)]


class Devices:
    """Every device of the server, each with its thread, models and engine."""

    def __init__(
        self,
        settings: Settings,
        served: list[ServedModel],
        default_model: str,
        vae: Any,
        sides: SideModels,
    ):
        from backends.sdxl_backend.generation.denoise import OutOfMemorySeam
        from backends.sdxl_backend.generation.engine import Engine
        from backends.sdxl_backend.models.controlnets import ControlNetSource
        from backends.sdxl_backend.models.ip_adapters import IpAdapterSource
        from backends.sdxl_backend.models.loras import LoraSource
        from backends.sdxl_backend.models.manager import ModelManager
        from backends.sdxl_backend.models.records import ModelSource
        from backends.sdxl_backend.models.upscalers import UpscalerSource
        from backends.sdxl_backend.prompts.embeddings import EmbeddingSet, EmbeddingSource

        placements = placements_of(settings)
        names = device_names([str(placement.device) for placement in placements])
        # Each device thread gets its share of the cores (torch's pools would fight otherwise).
        threads = max(1, (settings.torch_threads or usable_cores()) // len(placements))
        oom_seam = OutOfMemorySeam.parse(settings.test_fault_oom)
        if oom_seam:
            logger.warning("TEST SEAM ACTIVE: SDXL_TEST_FAULT_OOM=%s makes generations fail", settings.test_fault_oom)
        park = ParkSeam(settings.test_park_file) if settings.test_park_file else None
        if park:
            logger.warning("TEST SEAM ACTIVE: SDXL_TEST_PARK_FILE: jobs that say 'park' wait while that file exists")
        self.devices: list[Device] = []
        for name, placement in zip(names, placements):
            thread = DeviceThread(threads, name=f"sdxl-device-{name}" if len(names) > 1 else "sdxl-device")
            models = ModelManager(
                [ModelSource(m.id, m.path, m.defaults) for m in served],
                placement,
                aliases=settings.model_aliases,
                policy=settings.memory_policy,
                fast_paths=settings.fast_paths,
                vae=vae,
                loras=[LoraSource(lora.id, lora.path, lora.fits, lora.sampling) for lora in sides.loras],
                max_loaded_loras=settings.max_loaded_loras,
                controlnets=[ControlNetSource(c.id, c.path, c.fits) for c in sides.controlnets],
                max_loaded_controlnets=settings.max_loaded_controlnets,
                ip_adapters=[IpAdapterSource(a.id, a.path, a.fits) for a in sides.ip_adapters],
                max_loaded_ip_adapters=settings.max_loaded_ip_adapters,
                upscalers=[UpscalerSource(u.id, u.path) for u in sides.upscalers],
                max_loaded_upscalers=settings.max_loaded_upscalers,
                on_device=thread.run,
            )
            thread.run_at_exit(models.close)
            engine = Engine(
                models,
                default_model,
                settings.limits,
                oom_seam,
                settings.prompt_syntax,
                EmbeddingSet([EmbeddingSource(e.id, e.path, e.fits) for e in sides.embeddings]),
                settings.upscale_tiling,
            )
            if settings.test_fault_device == name:
                logger.warning("TEST SEAM ACTIVE: SDXL_TEST_FAULT_DEVICE=%s: that device fails at its first job", name)
                engine.run_batch = _lost_at_first_job  # type: ignore[method-assign]
            self.devices.append(Device(name, engine, thread, park))
        logger.info(
            "devices: %s (%d CPU thread(s) each)",
            ", ".join(f"{d.name} = {p.describe()}" for d, p in zip(self.devices, placements)),
            threads,
        )

    @property
    def engine(self) -> Engine:
        """The engine that prepares and checks requests: any device's (they serve the same models)."""
        return self.devices[0].engine

    def warm_up(self) -> list[Any]:
        """Each device loads the default model and runs it once, on its own thread (futures)."""
        return [device.thread.call(functools.partial(_warm_up, device)) for device in self.devices]

    async def unload(self) -> list[str]:
        """Every device frees its loaded models that no request is using (after its running batch)."""
        unloaded = await asyncio.gather(
            *(asyncio.wrap_future(device.thread.call(device.engine.models.unload)) for device in self.devices)
        )
        return sorted({model for models in unloaded for model in models})

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "name": device.name,
                "alive": device.thread.is_alive(),
                **device.engine.models.status(),
                "torch_threads": device.thread.torch_threads,
            }
            for device in self.devices
        ]

    def cards(self, running_here: list[Job]) -> list[dict[str, Any]]:
        """Each device as the fleet page shows it: its memory, loaded models (and ControlNets,
        IP-Adapters, upscalers) and the job it runs. No job ids, prompts or keys."""
        running = {job.device: job for job in running_here}
        cards = []
        for device in self.status():
            job = running.get(device["name"])
            cards.append(
                {
                    "name": device["name"],
                    "device_name": device["device_name"],
                    "alive": device["alive"],
                    "memory": {kind: device["memory"][kind] for kind in ("used", "total", "budget")},
                    "loaded": [{"id": model["id"], "loras": model["loras"]} for model in device["loaded"]],
                    "side_models": [
                        side["id"] for kind in ("controlnets", "ip_adapters", "upscalers") for side in device[kind]
                    ],
                    "running": job
                    and {
                        "model": job.model or self.engine.default_model,
                        "step": job.step,
                        "total_steps": job.total_steps,
                    },
                }
            )
        return cards

    def memory(self) -> tuple[int, int] | None:
        """(used, total) bytes of the devices' memory together; None on the CPU."""
        from backends.sdxl_backend.device import device_memory

        readings = [reading for device in self.devices if (reading := device_memory(device.engine.models.placement))]
        return (sum(r[0] for r in readings), sum(r[1] for r in readings)) if readings else None

    def memory_by_device(self) -> dict[str, tuple[int, int]]:
        """Each device's (used, total) bytes; on the CPU the host's memory."""
        from backends.sdxl_backend.device import memory_in_use

        return {device.name: memory_in_use(device.engine.models.placement) for device in self.devices}

    def thread_status(self) -> dict[str, Any]:
        threads = [device.thread for device in self.devices]
        return {
            "name": threads[0].name,
            "names": [thread.name for thread in threads],
            "torch_threads": threads[0].torch_threads,
            "torch_work": TORCH_WORK.threads(),
        }

    def models_fitting(self, fits: str, embedding: bool) -> list[str]:
        """The served models of a UNet architecture (LoRAs, ControlNets, IP-Adapters fit one),
        or, for an `embedding`, of text encoder widths."""
        from backends.sdxl_backend.prompts.embeddings import fits_model

        sources = self.engine.models.sources.items()
        if embedding:
            return [m for m, source in sources if fits_model(fits, source.text_signature)]
        return [m for m, source in sources if source.unet_signature == fits]

    def is_loaded(self, model_id: str) -> bool:
        return any(device.engine.models.is_loaded(model_id) for device in self.devices)


def _warm_up(device: Device) -> None:
    TORCH_WORK.note("warm-up")
    started = time.perf_counter()
    engine = device.engine
    (outcome,) = engine.generate_batch([(engine.prepare(GenerationRequest(prompt="warm-up", steps=2)), None)])
    if isinstance(outcome, Exception):
        raise outcome
    logger.info("warm-up of %s on %s done in %.2f s", engine.default_model, device.name, time.perf_counter() - started)


def _lost_at_first_job(batch: list[Any]) -> list[Any]:
    """The device worker's call (`Engine.run_batch`), gone: the warm-up, which calls the engine
    itself, still runs."""
    raise DeviceLost("the device is gone (SDXL_TEST_FAULT_DEVICE)")
