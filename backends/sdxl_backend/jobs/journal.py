"""The memory queue's journal: one small file per job held (its status, owner, times, error),
so that a worker BentoML restarts still answers for the job ids the one before handed out."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from backends.sdxl_backend.errors import BackendError
from backends.sdxl_backend.jobs.job import Job, JobStatus


class JobJournal:
    """One small file per job held (its status, owner, times, error), so that a restarted
    worker still answers for the ids the one before handed out: a job that was queued or
    running then is failed with a message that says so. Images are not journalled."""

    def __init__(self, directory: Path):
        """`directory` is made private to this user (0700): its names are job ids, its records
        key digests. The default lies in the shared temporary folder, where another user could
        have made it first, or a link of that name: then it is refused, not used."""
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if directory.is_symlink() or directory.stat().st_uid != os.getuid():
            raise RuntimeError(f"{directory}: the job journal's folder is not this user's own (SDXL_JOBS_DIR)")
        directory.chmod(0o700)

    def write(self, job: Job) -> None:
        record = {
            "status": job.status.value,
            "owner": job.owner,
            "created": job.created,
            "started": job.started,
            "finished": job.finished,
            "step": job.step,
            "total_steps": job.total_steps,
            "error": job.error.message if job.error else None,
        }
        temporary = self.directory / f".{job.id}.tmp"
        temporary.write_text(json.dumps(record))
        os.replace(temporary, self.directory / job.id)

    def forget(self, job_id: str) -> None:
        (self.directory / job_id).unlink(missing_ok=True)

    def recover(self) -> list[Job]:
        """The jobs of the worker before, oldest first; unfinished ones failed (and rewritten)."""
        jobs = []
        for file in self.directory.iterdir():
            if file.name.startswith("."):
                continue
            try:
                record = json.loads(file.read_text())
            except (OSError, ValueError):
                continue
            status = JobStatus(record["status"])
            job = Job(
                file.name,
                None,
                owner=record["owner"],
                created=record["created"],
                started=record["started"],
                finished=record["finished"],
                step=record["step"],
                total_steps=record["total_steps"],
            )
            if status.final:
                job.status = status
                job.error = BackendError(record["error"]) if record["error"] else None
                if status == JobStatus.SUCCEEDED:  # its images were in the lost worker's memory
                    job.error = BackendError("the worker restarted after this job succeeded; its images are lost")
            else:
                job.status, job.finished = JobStatus.FAILED, time.time()
                job.error = BackendError(f"failed: the worker restarted while this job was {status.value}")
                self.write(job)
            jobs.append(job)
        return sorted(jobs, key=lambda job: job.created)
