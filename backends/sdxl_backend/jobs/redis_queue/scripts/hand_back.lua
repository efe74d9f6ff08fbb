-- ARGV[5]: the id, [6]: the replica handing it back (a stopping one). 1 if it was re-queued.
-- (with requeue.lua)
if redis.call('HGET', running, ARGV[5]) ~= ARGV[6] then return 0 end
redis.call('HINCRBY', job_key(ARGV[5]), 'attempts', -1)
requeue(ARGV[5])
redis.call('RPUSH', prefix .. 'wake', '1')
return 1
