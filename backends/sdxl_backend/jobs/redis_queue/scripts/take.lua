-- ARGV[5]: the replica, [6]: images per pipeline call, [7]: how far down the queue to look for
-- jobs to batch with the oldest. The ids taken, oldest first.
local head = redis.call('LPOP', queue)
while head and redis.call('EXISTS', job_key(head)) == 0 do head = redis.call('LPOP', queue) end  -- (deleted by hand)
if not head then return {} end
local taken = {head}
local fields = redis.call('HMGET', job_key(head), 'n', 'batch_key')
local images, key, max_batch = tonumber(fields[1] or '1'), fields[2], tonumber(ARGV[6])
if key and key ~= '' and images < max_batch then
  for _, id in ipairs(redis.call('LRANGE', queue, 0, tonumber(ARGV[7]) - 1)) do
    local other = redis.call('HMGET', job_key(id), 'n', 'batch_key')
    local n = tonumber(other[1] or '0')
    if other[2] == key and images + n <= max_batch then
      redis.call('LREM', queue, 1, id)
      table.insert(taken, id)
      images = images + n
      if images == max_batch then break end
    end
  end
end
for _, id in ipairs(taken) do
  redis.call('HSET', job_key(id), 'status', 'running', 'started', ARGV[1], 'replica', ARGV[5])
  redis.call('HINCRBY', job_key(id), 'attempts', 1)
  redis.call('HINCRBY', job_key(id), 'version', 1)
  redis.call('HSET', running, id, ARGV[5])
  changed(id)
end
return taken
