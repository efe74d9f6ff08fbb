-- ARGV[5]: runs allowed. Re-queues (or fails) the running jobs of replicas whose heartbeat has
-- lapsed, the oldest nearest the head; evicts. {re-queued, failed}.
-- (with requeue.lua)
local orphans, created = {}, {}
local entries = redis.call('HGETALL', running)
for i = 1, #entries, 2 do
  if redis.call('EXISTS', prefix .. 'replica:' .. entries[i + 1]) == 0 then
    table.insert(orphans, entries[i])
    created[entries[i]] = tonumber(redis.call('HGET', job_key(entries[i]), 'created') or '0')
  end
end
table.sort(orphans, function(a, b) return created[a] > created[b] end)
local requeued, failed = 0, 0
for _, id in ipairs(orphans) do
  local job = redis.call('HMGET', job_key(id), 'attempts', 'cancel_requested_at')
  if redis.call('EXISTS', job_key(id)) == 0 then
    redis.call('HDEL', running, id)
  elseif job[2] and job[2] ~= '' then
    fail(id, 'cancelled', 'Cancelled', 'job ' .. id .. ' cancelled; its replica stopped before it could stop the job')
  elseif tonumber(job[1] or '0') >= tonumber(ARGV[5]) then
    fail(id, 'failed', 'BackendError', 'failed: the replica running this job stopped (' .. job[1]
         .. ' times); it will not be tried again')
    failed = failed + 1
  else
    requeue(id)
    requeued = requeued + 1
  end
end
evict()
return {requeued, failed}
