-- The waiting jobs in turn order: jobs/turns.py states the rule, this is the same rule in Lua.
-- `order`: 'fair' (owners take turns within a priority) or 'fifo'. Returns the ordered ids and
-- the ids queued whose job is gone (deleted by hand).
local PRIORITIES = {high = 0, normal = 1, low = 2}
local function in_turn(order)
  local last, rounds, keyed, missing = {}, {}, {}, {}
  local turns = redis.call('HGETALL', prefix .. 'turns')
  for i = 1, #turns, 2 do last[turns[i]] = tonumber(turns[i + 1]) end
  for arrival, id in ipairs(redis.call('LRANGE', queue, 0, -1)) do
    local fields = redis.call('HMGET', job_key(id), 'status', 'owner', 'priority')
    if not fields[1] then
      table.insert(missing, id)
    else
      local name = fields[3] or 'normal'
      local slot, priority = name .. ':' .. (fields[2] or ''), PRIORITIES[name] or 1
      local round, turn = 0, 0
      if order == 'fair' then
        round = rounds[slot] or 0
        rounds[slot] = round + 1
        turn = last[slot] or 0
      end
      table.insert(keyed, {priority, round, turn, arrival, id})
    end
  end
  table.sort(keyed, function(a, b)
    for i = 1, 4 do
      if a[i] ~= b[i] then return a[i] < b[i] end
    end
    return false
  end)
  local ordered = {}
  for i, entry in ipairs(keyed) do ordered[i] = entry[5] end
  return ordered, missing
end
