-- Shared by every script (prepended to each). KEYS[1]: the key prefix (keys.py names the same
-- keys). ARGV[1..4]: now, the finished jobs' time to live, their greatest count and bytes;
-- ARGV[5...]: the script's own. ($$inputs and $$tombstone_ttl_s are filled in when loaded.)
local prefix = KEYS[1]
local queue, running, finished, index, total = prefix .. 'queue', prefix .. 'running', prefix .. 'finished',
  prefix .. 'index', prefix .. 'bytes'
local now, ttl, max_jobs, max_bytes = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local INPUTS = {$inputs}
local function job_key(id) return prefix .. 'job:' .. id end
local function changed(id, final) redis.call('PUBLISH', prefix .. 'changed', final and (id .. ' final') or id) end
local function finalize(id, status, held)
  local job = job_key(id)
  redis.call('HDEL', job, unpack(INPUTS))
  redis.call('HSET', job, 'status', status, 'finished', ARGV[1], 'held', held)
  redis.call('HINCRBY', job, 'version', 1)
  redis.call('HDEL', running, id)
  redis.call('ZADD', finished, now, id)
  redis.call('INCRBY', total, held)
  changed(id, true)
end
local function fail(id, status, error_type, message)
  redis.call('HSET', job_key(id), 'error_type', error_type, 'error_message', message, 'error_param', '')
  redis.call('HDEL', job_key(id), 'preview')
  finalize(id, status, 0)
end
local function evict()
  while true do
    local oldest = redis.call('ZRANGE', finished, 0, 0, 'WITHSCORES')
    if #oldest == 0 then return end
    local id, at = oldest[1], tonumber(oldest[2])
    if now - at <= ttl and redis.call('ZCARD', finished) <= max_jobs
        and tonumber(redis.call('GET', total) or '0') <= max_bytes then
      return
    end
    redis.call('DECRBY', total, tonumber(redis.call('HGET', job_key(id), 'held') or '0'))
    redis.call('DEL', job_key(id))
    redis.call('ZREM', finished, id)
    redis.call('ZREM', index, id)
    redis.call('SET', prefix .. 'gone:' .. id, '1', 'EX', $tombstone_ttl_s)
  end
end
