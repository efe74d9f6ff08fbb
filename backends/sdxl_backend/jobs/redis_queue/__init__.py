"""The job queue of a fleet: replicas that share one Redis (`SDXL_REDIS_URL`) share one queue.

Every generation, a synchronous one too, is a job in Redis: any replica answers for any job
(status, queue position, progress, previews, events, cancel, result), and each device thread of
each replica takes the next jobs only when its device is free, so work goes to idle GPUs, API
keys taking turns across the fleet (jobs/turns.py). It keeps the `JobQueue` contract
(jobs/contract.py); the `Job`s it hands out are snapshots, read again with `refresh`. The
package: keys.py (every key's name), scripts/ (the Lua scripts), codec.py (jobs to and from
hash fields), feed.py (the change notices), heartbeat.py (this replica's heartbeat, the reclaim
of stopped replicas' jobs, whether Redis answers), queue.py (`SharedJobQueue`: the API's side
and the device worker's).

How it sits in Redis (one Redis, or a primary with replicas; not a Redis Cluster, whose scripts
may only touch keys they declare):

- `sdxl:jobs:queue`, a list of waiting job ids in arrival order; `sdxl:jobs:turns`, each
  owner's last turn at each priority, which orders them; `sdxl:jobs:job:<id>`, a hash per
  job (its prepared request with the input images as PNG, its state, then its result);
  `sdxl:jobs:running`, running job id -> the replica running it; `sdxl:jobs:replica:<name>`,
  each replica's heartbeat (its card, JSON: what it serves and runs, for the fleet page), which
  expires when it stops beating. A device thread with nothing
  to do waits on `sdxl:jobs:wake` (pushed by every submit) and `sdxl:jobs:wake:<name>/<device>`
  (work handed to that device thread, such as an unload), a second at most.
- Every change is one Lua script, so no two replicas ever take the same job or half-change one.
  TAKE orders the waiting jobs by turns (turns.lua, the rule of jobs/turns.py: one script decides
  the next job for every replica) and takes the first, with the jobs near their turn that can
  share its pipeline call (the same `Engine.batch_key`, computed when it was submitted) while
  their images fit `max_batch`; POSITION reads a job's place in the same order.
- A replica whose heartbeat lapsed (killed, its node gone) leaves its running jobs to RECLAIM,
  which any replica runs every few seconds: each goes back to the head of the queue, or, after
  `MAX_ATTEMPTS` runs, fails with an error that says so. A replica that is stopped hands its
  running job back at the next step. Queued jobs belong to the fleet and outlive every replica.
- Cancel and interrupt are flags in the job's hash; the running replica reads them between two
  denoising steps, so a cancel sent to any replica stops the job at its next step.
- Every change of a job (taken, a step, a flag, finished, re-queued) is published on the channel
  `sdxl:jobs:changed` as the job's id (`<id> final` when it ends). Each replica holds one
  subscription (`ChangeFeed`, feed.py) and wakes the requests waiting on that job, which then read it: an
  event stream follows each step, a synchronous request reads its job once more when it ends,
  wherever it runs, and none reads in a loop. A notice lost while Redis reconnects costs a waiter
  at most `FALLBACK_S`: it reads its job that often anyway.
- Finished jobs are indexed by finishing time and evicted by age (`ttl_s`), count (`max_jobs`)
  and the bytes their images hold (`max_bytes`), the bounds of `JobQueue`; an evicted id leaves a
  tombstone for `QueueBounds.tombstone_ttl_s`, a day (expired, 410, rather than unknown, 404).

Why a list and scripts rather than a stream and a consumer group: a consumer group delivers
entries strictly in order, one at a time, so the compatible jobs further back that one pipeline
call can take with the oldest (cross-request batching) cannot be picked; the reliable-queue
pattern on a list (a running set beside the queue, heartbeats, reclaim) can, and the queue's
length is what KEDA's Redis scaler reads to add replicas.
"""

from backends.sdxl_backend.jobs.redis_queue.queue import SharedJobQueue

__all__ = ["SharedJobQueue"]
