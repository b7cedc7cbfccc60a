-- Apply trending updates: a decayed click sum per item (log2, forward decay) and, for items
-- whose category is known, the same score in that category's sorted set.
--
-- KEYS[1] all (ZSET item -> log2 sum), KEYS[2] meta (HASH: cat:<item> = category,
--         wm:<topic:partition> = last applied offset); category sets are KEYS[1] with
--         ":c:<category>" appended (same hash slot)
-- ARGV: n, then n times: source, offset, op, item, value
--       op "c": a click, value = log2 contribution;  op "i": catalog record, value = category
local all, meta = KEYS[1], KEYS[2]
local LN2 = math.log(2)
local n = tonumber(ARGV[1])
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

for _ = 1, n do
  local source, offset, op, item, value = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  a = a + 5
  local wm = tonumber(redis.call('HGET', meta, 'wm:' .. source) or '-1')
  if offset > wm then
    redis.call('HSET', meta, 'wm:' .. source, offset)
    applied = applied + 1
    local category = redis.call('HGET', meta, 'cat:' .. item)
    if op == 'c' then
      local cur = redis.call('ZSCORE', all, item)
      local score = string.format('%.17g', log_add(cur and tonumber(cur), tonumber(value)))
      redis.call('ZADD', all, score, item)
      if category then redis.call('ZADD', all .. ':c:' .. category, score, item) end
    elseif category ~= value then
      if category then redis.call('ZREM', all .. ':c:' .. category, item) end
      if value == '' then
        redis.call('HDEL', meta, 'cat:' .. item)
      else
        redis.call('HSET', meta, 'cat:' .. item, value)
        local cur = redis.call('ZSCORE', all, item)
        if cur then redis.call('ZADD', all .. ':c:' .. value, cur, item) end
      end
    end
  end
end
return applied
