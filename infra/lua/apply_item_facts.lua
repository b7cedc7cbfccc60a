-- Apply learner updates to item-level state (CF neighbours and counts, bandit sums).
--
-- KEYS: for each item: nbr (ZSET neighbour -> log2 co-occurrence sum), stats (HASH: n = log2
--       click sum, e/c[|segment] = log2 bandit sums, segments = how many segments have sums,
--       wm:<topic:partition> = last applied offset)
-- ARGV: max_neighbours, ttl_ms, max_segments, then for each item: g (groups), then g times:
--         source ("topic:partition"), offset, m (ops), then m times: op, a, x
--         op "n": stats[n] += x          op "p": nbr[a] += x (a = neighbour item)
--         op "b": stats[a] += x (a = bandit field)
-- "+=" is addition in log2 space. A group is skipped when its offset is not above the
-- item's watermark for that source partition: applying a record twice changes nothing.
-- Bounds: at most max_neighbours neighbours, cut once per item per call (the weakest dropped,
-- ties by member, as models.learners.ItemCF.learn_many per batch), and max_segments segments
-- per item (a segment beyond them is not recorded); both keys of an item that got an update
-- expire ttl_ms after it (0: never). The worker sends a batch summed per item
-- (apply_item_batch.lua) and this script only for items whose records straddle a watermark.
local max_nb = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local max_seg = tonumber(ARGV[3])
local a = 4
local applied = 0

-- @include log_space.lua


-- Whether a per-segment bandit field ("e|<segment>" or "c|<segment>") may be written: its
-- segment already has sums, or there is room for one more (then it is counted).
local function segment_room(stats, field)
  if redis.call('HEXISTS', stats, field) == 1 then return true end
  local sibling = (string.sub(field, 1, 1) == 'e' and 'c' or 'e') .. string.sub(field, 2)
  if redis.call('HEXISTS', stats, sibling) == 1 then return true end
  local count = tonumber(redis.call('HGET', stats, 'segments') or '0')
  if count >= max_seg then return false end
  redis.call('HSET', stats, 'segments', count + 1)
  return true
end

for i = 0, (#KEYS / 2) - 1 do
  local nbr, stats = KEYS[i * 2 + 1], KEYS[i * 2 + 2]
  local g = tonumber(ARGV[a]); a = a + 1
  local touched, paired = false, false
  for _ = 1, g do
    local source, offset, m = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    a = a + 3
    local wm = tonumber(redis.call('HGET', stats, 'wm:' .. source) or '-1')
    local fresh = offset > wm
    for _ = 1, m do
      local op, arg, x = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
      a = a + 3
      if fresh then
        if op == 'p' then
          local cur = redis.call('ZSCORE', nbr, arg)
          redis.call('ZADD', nbr, fmt(log_add(cur and tonumber(cur), x)), arg)
          paired = true
        elseif op == 'n' or string.sub(arg, 2, 2) ~= '|' or segment_room(stats, arg) then
          local field = op == 'n' and 'n' or arg
          local cur = redis.call('HGET', stats, field)
          redis.call('HSET', stats, field, fmt(log_add(cur and tonumber(cur), x)))
        end
      end
    end
    if fresh then
      redis.call('HSET', stats, 'wm:' .. source, offset)
      applied = applied + 1
      touched = true
    end
  end
  if paired then
    local excess = redis.call('ZCARD', nbr) - max_nb
    if excess > 0 then redis.call('ZREMRANGEBYRANK', nbr, 0, excess - 1) end
  end
  if touched and ttl > 0 then
    redis.call('PEXPIRE', nbr, ttl)
    redis.call('PEXPIRE', stats, ttl)
  end
end
return applied
