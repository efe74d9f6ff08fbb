"""Jobs: every generation (and upscale) the service runs, queued, observable and cancellable.

- job.py: `Job`, what the device does to it at each step, and its end (`Job.settle`);
- contract.py: what the API layer may ask of a store of jobs (`JobQueue`, `WebhookLedger`,
  `FleetView`); two stores keep all three:
  memory.py (`MemoryJobQueue`, one process, with journal.py) and redis_queue/ (`SharedJobQueue`,
  replicas sharing one Redis);
- turns.py: whose job runs next (API keys take turns; priorities) and the queue's bounds;
- worker.py: `DeviceWorker`, the one loop that runs either store's jobs on a device's thread
  (one worker per device, over one queue);
- waiting.py: how a request waits on a job (woken by its changes, never reading it in a loop).

Why not BentoML's task API (`@bentoml.task`): it runs a task to its end and reports only
pending/success/failure, so it can give neither step progress, nor a queue position, nor stop a
running generation between two denoising steps; the queue here is what those need.
"""

from backends.sdxl_backend.jobs.contract import JobQueue
from backends.sdxl_backend.jobs.job import Job, JobStatus
from backends.sdxl_backend.jobs.journal import JobJournal
from backends.sdxl_backend.jobs.memory import MemoryJobQueue

__all__ = ["Job", "JobJournal", "JobQueue", "JobStatus", "MemoryJobQueue"]
