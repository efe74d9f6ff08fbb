-- ARGV[5]: this replica. Claims the webhook events held by replicas whose heartbeat has lapsed
-- (their delivery may never have been made); lets go of those whose job is gone.
-- {job id, event, message id, ...}
local held, claimed = redis.call('HGETALL', prefix .. 'webhooks'), {}
for i = 1, #held, 2 do
  local hold = cjson.decode(held[i + 1])
  if redis.call('EXISTS', prefix .. 'replica:' .. hold.replica) == 0 then
    local id, event = string.match(held[i], '^(%S+) (%S+)$')
    if redis.call('EXISTS', job_key(id)) == 0 then
      redis.call('HDEL', prefix .. 'webhooks', held[i])
    else
      hold.replica = ARGV[5]
      redis.call('HSET', prefix .. 'webhooks', held[i], cjson.encode(hold))
      table.insert(claimed, id)
      table.insert(claimed, event)
      table.insert(claimed, hold.message_id)
    end
  end
end
return claimed
