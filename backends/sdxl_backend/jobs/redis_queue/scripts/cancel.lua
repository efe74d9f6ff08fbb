-- ARGV[5]: the id, [6]: 'cancel' or 'stop' (end the denoising early, keep the image), [7]: the
-- message of a queued job cancelled. The job's status before, false when there is no such job.
local job = job_key(ARGV[5])
local status = redis.call('HGET', job, 'status')
if status == 'queued' then
  redis.call('LREM', queue, 1, ARGV[5])
  redis.call('HSET', job, 'cancel_requested_at', ARGV[1])
  fail(ARGV[5], 'cancelled', 'Cancelled', ARGV[7])
  evict()
elseif status == 'running' then
  local flag = ARGV[6] == 'stop' and 'stop_requested_at' or 'cancel_requested_at'
  if (redis.call('HGET', job, flag) or '') == '' then
    redis.call('HSET', job, flag, ARGV[1])
    redis.call('HINCRBY', job, 'version', 1)
    changed(ARGV[5])
  end
end
return status
