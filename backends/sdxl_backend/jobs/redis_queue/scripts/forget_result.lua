-- ARGV[5]: the id. A delivered result's images go; the record stays.
local job = job_key(ARGV[5])
if redis.call('ZSCORE', finished, ARGV[5]) == false then return 0 end
local count = tonumber(redis.call('HGET', job, 'images') or '0')
for i = 0, count - 1 do redis.call('HDEL', job, 'image:' .. i) end
redis.call('HDEL', job, 'result', 'preview')
redis.call('DECRBY', total, tonumber(redis.call('HGET', job, 'held') or '0'))
redis.call('HSET', job, 'held', 0, 'images', 0)
return 1
