-- Apply learner updates to item-level state (CF neighbours and counts, bandit sums).
--
-- KEYS: for each item: nbr (ZSET neighbour -> log2 co-occurrence sum), stats (HASH: n = log2
--       click sum, e/c[|segment] = log2 bandit sums, wm:<topic:partition> = last applied offset)
-- ARGV: max_neighbours, then for each item: g (groups), then g times:
--         source ("topic:partition"), offset, m (ops), then m times: op, a, x
--         op "n": stats[n] += x          op "p": nbr[a] += x (a = neighbour item)
--         op "b": stats[a] += x (a = bandit field)
-- "+=" is addition in log2 space. A group is skipped when its offset is not above the
-- item's watermark for that source partition: applying a record twice changes nothing.
local max_nb = tonumber(ARGV[1])
local LN2 = math.log(2)
local a = 2
local applied = 0

-- (log_add is repeated in each script that needs it: Redis scripts cannot share code, and
-- the two scripts touch keys in different hash slots, so they cannot be one script)
local function log_add(cur, x)
  if not cur then return x end
  local hi, lo = cur, x
  if lo > hi then hi, lo = x, cur end
  return hi + math.log(1 + 2 ^ (lo - hi)) / LN2
end

local function fmt(v) return string.format('%.17g', v) end

for i = 0, (#KEYS / 2) - 1 do
  local nbr, stats = KEYS[i * 2 + 1], KEYS[i * 2 + 2]
  local g = tonumber(ARGV[a]); a = a + 1
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
          if redis.call('ZCARD', nbr) > max_nb then redis.call('ZREMRANGEBYRANK', nbr, 0, 0) end
        else
          local field = op == 'n' and 'n' or arg
          local cur = redis.call('HGET', stats, field)
          redis.call('HSET', stats, field, fmt(log_add(cur and tonumber(cur), x)))
        end
      end
    end
    if fresh then
      redis.call('HSET', stats, 'wm:' .. source, offset)
      applied = applied + 1
    end
  end
end
return applied
