-- Puts a running job back at the head of the queue, as it was before it started.
local function requeue(id)
  redis.call('HDEL', running, id)
  redis.call('HSET', job_key(id), 'status', 'queued', 'replica', '', 'started', '', 'step', 0, 'first_step_at', '',
             'preview_step', 0, 'stop_requested_at', '', 'device', '')
  redis.call('HDEL', job_key(id), 'preview')
  redis.call('HINCRBY', job_key(id), 'version', 1)
  redis.call('LPUSH', queue, id)
  changed(id)
end
