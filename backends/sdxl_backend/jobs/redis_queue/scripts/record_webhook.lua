-- ARGV[5]: the id, [6]: the field ("webhook:<event>"), [7]: the delivery's outcome (JSON). Kept
-- only on a job still held (an evicted job's hash is not made again); its watchers are told.
if redis.call('EXISTS', job_key(ARGV[5])) == 0 then return 0 end
redis.call('HSET', job_key(ARGV[5]), ARGV[6], ARGV[7])
redis.call('HINCRBY', job_key(ARGV[5]), 'version', 1)
changed(ARGV[5])
return 1
