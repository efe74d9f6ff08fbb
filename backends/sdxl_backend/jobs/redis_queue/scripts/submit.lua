-- ARGV[5]: the queue's bound, [6]: the id, [7...]: the job's fields. 0 when the queue is full,
-- else the job's position.
if redis.call('LLEN', queue) >= tonumber(ARGV[5]) then return 0 end
redis.call('HSET', job_key(ARGV[6]), unpack(ARGV, 7))
redis.call('ZADD', index, now, ARGV[6])
redis.call('RPUSH', prefix .. 'wake', '1')
redis.call('LTRIM', prefix .. 'wake', -64, -1)
return redis.call('RPUSH', queue, ARGV[6])
