-- ARGV[5]: the replica, [6]: images per pipeline call, [7]: how many jobs in turn order the
-- head looks at for others to join its batch, [8]: the queue's order, [9]: the device taking.
-- The ids taken, in turn order. (with turns.lua)
local ordered, missing = in_turn(ARGV[8])
for _, id in ipairs(missing) do redis.call('LREM', queue, 0, id) end
if #ordered == 0 then return {} end
local head = ordered[1]
local taken = {head}
local fields = redis.call('HMGET', job_key(head), 'n', 'batch_key')
local images, key, max_batch = tonumber(fields[1] or '1'), fields[2], tonumber(ARGV[6])
if key and key ~= '' and images < max_batch then
  for i = 2, math.min(#ordered, tonumber(ARGV[7])) do
    local other = redis.call('HMGET', job_key(ordered[i]), 'n', 'batch_key')
    local n = tonumber(other[1] or '0')
    if other[2] == key and images + n <= max_batch then
      table.insert(taken, ordered[i])
      images = images + n
      if images == max_batch then break end
    end
  end
end
for _, id in ipairs(taken) do
  local job = job_key(id)
  redis.call('LREM', queue, 1, id)
  local who = redis.call('HMGET', job, 'priority', 'owner')
  redis.call('HSET', prefix .. 'turns', (who[1] or 'normal') .. ':' .. (who[2] or ''), redis.call('INCR', prefix .. 'turn'))
  redis.call('HSET', job, 'status', 'running', 'started', ARGV[1], 'replica', ARGV[5], 'device', ARGV[9])
  redis.call('HINCRBY', job, 'attempts', 1)
  redis.call('HINCRBY', job, 'version', 1)
  redis.call('HSET', running, id, ARGV[5])
  changed(id)
end
return taken
