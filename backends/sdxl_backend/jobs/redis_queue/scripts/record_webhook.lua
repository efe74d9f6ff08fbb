-- ARGV[5]: the id, [6]: the field ("webhook:<event>"), [7]: the delivery's outcome (JSON). Lets
-- go of the event's hold; the outcome is kept only on a job still held (an evicted job's hash
-- is not made again), and its watchers are told.
redis.call('HDEL', prefix .. 'webhooks', ARGV[5] .. ' ' .. string.sub(ARGV[6], 9))
if redis.call('EXISTS', job_key(ARGV[5])) == 0 then return 0 end
redis.call('HSET', job_key(ARGV[5]), ARGV[6], ARGV[7])
redis.call('HINCRBY', job_key(ARGV[5]), 'version', 1)
changed(ARGV[5])
return 1
