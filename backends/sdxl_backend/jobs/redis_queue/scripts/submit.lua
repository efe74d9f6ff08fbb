-- ARGV[5]: the queue's bound, [6]: one owner's bound (0: none), [7]: the owner, [8]: the id,
-- [9...]: the job's fields. {the job's place in arrival order}, or, when a bound refuses it,
-- {0, jobs waiting, the owner's jobs waiting} (jobs/contract.py's `refuse_when_full` says which).
local waiting = redis.call('LRANGE', queue, 0, -1)
local owners = 0
if tonumber(ARGV[6]) > 0 then
  for _, id in ipairs(waiting) do
    if (redis.call('HGET', job_key(id), 'owner') or '') == ARGV[7] then owners = owners + 1 end
  end
end
if #waiting >= tonumber(ARGV[5]) or (tonumber(ARGV[6]) > 0 and owners >= tonumber(ARGV[6])) then
  return {0, #waiting, owners}
end
redis.call('HSET', job_key(ARGV[8]), unpack(ARGV, 9))
redis.call('ZADD', index, now, ARGV[8])
redis.call('RPUSH', prefix .. 'wake', '1')
redis.call('LTRIM', prefix .. 'wake', -64, -1)
return {redis.call('RPUSH', queue, ARGV[8])}
