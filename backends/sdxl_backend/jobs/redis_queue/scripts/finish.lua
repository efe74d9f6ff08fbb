-- ARGV[5]: the id, [6]: the replica, [7]: the bytes it holds, [8...]: its final fields. 0 when the
-- replica no longer owns the job (it was re-queued after its heartbeat lapsed).
if redis.call('HGET', running, ARGV[5]) ~= ARGV[6] then return 0 end
redis.call('HSET', job_key(ARGV[5]), unpack(ARGV, 8))
finalize(ARGV[5], redis.call('HGET', job_key(ARGV[5]), 'status'), tonumber(ARGV[7]))
evict()
return 1
