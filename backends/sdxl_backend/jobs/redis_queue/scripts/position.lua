-- ARGV[5]: the id, [6]: the queue's order. Its place in turn order (1: next), 0 when not waiting.
-- (with turns.lua)
for index, id in ipairs((in_turn(ARGV[6]))) do
  if id == ARGV[5] then return index end
end
return 0
