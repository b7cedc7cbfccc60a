-- Apply trending updates: a decayed click sum per item (log2, forward decay) and, for items
-- whose category is known, the same score in that category's sorted set.
--
-- KEYS[1] all (ZSET item -> log2 sum), KEYS[2] meta (HASH: cat:<item> = category,
--         wm:<topic:partition> = last applied offset), KEYS[2 + k] the sorted set of the
--         k-th category named in ARGV (every key the script writes is passed in KEYS)
-- ARGV: max_items, m, then m category names (in KEYS order), then n, then n times: source,
--       offset, op, item, value;  op "c": a click, value = log2 contribution;  op "i": catalog
--       record, value = category ("" for none)
-- Each sorted set keeps its max_items highest scores (the lowest is dropped beyond that); an
-- item dropped from the global set but kept in its category's continues from the latter.
-- Returns the number of ops applied, or {'missing', category, ...} without writing anything
-- when a category the ops touch (an item's current one, or a new one) has no key in KEYS:
-- the caller passes those keys too and calls again.
local all, meta = KEYS[1], KEYS[2]
local max_items = tonumber(ARGV[1])
local m = tonumber(ARGV[2])
local cat_key = {}
for k = 1, m do cat_key[ARGV[2 + k]] = KEYS[2 + k] end
local n = tonumber(ARGV[m + 3])
local first = m + 4

local missing = {}
local a = first
for _ = 1, n do
  local op, item, value = ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  a = a + 5
  local current = redis.call('HGET', meta, 'cat:' .. item)
  if current and not cat_key[current] then missing[current] = true end
  if op == 'i' and value ~= '' and not cat_key[value] then missing[value] = true end
end
if next(missing) then
  local out = {'missing'}
  for cat in pairs(missing) do out[#out + 1] = cat end
  return out
end

local LN2 = math.log(2)
a = first
local applied = 0

-- (log_add is repeated in each script that needs it: Redis scripts cannot share code, and
-- the two scripts touch keys in different hash slots, so they cannot be one script)
local function log_add(cur, x)
  if not cur then return x end
  local hi, lo = cur, x
  if lo > hi then hi, lo = x, cur end
  return hi + math.log(1 + 2 ^ (lo - hi)) / LN2
end

-- ZADD, then keep the max_items highest.
local function add(key, score, item)
  redis.call('ZADD', key, score, item)
  local excess = redis.call('ZCARD', key) - max_items
  if excess > 0 then redis.call('ZREMRANGEBYRANK', key, 0, excess - 1) end
end

for _ = 1, n do
  local source, offset, op, item, value = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  a = a + 5
  local wm = tonumber(redis.call('HGET', meta, 'wm:' .. source) or '-1')
  if offset > wm then
    redis.call('HSET', meta, 'wm:' .. source, offset)
    applied = applied + 1
    local category = redis.call('HGET', meta, 'cat:' .. item)
    local cur = redis.call('ZSCORE', all, item)
    if not cur and category then cur = redis.call('ZSCORE', cat_key[category], item) end
    if op == 'c' then
      local score = string.format('%.17g', log_add(cur and tonumber(cur), tonumber(value)))
      add(all, score, item)
      if category then add(cat_key[category], score, item) end
    elseif category ~= value then
      if category then redis.call('ZREM', cat_key[category], item) end
      if value == '' then
        redis.call('HDEL', meta, 'cat:' .. item)
      else
        redis.call('HSET', meta, 'cat:' .. item, value)
        if cur then add(cat_key[value], cur, item) end
      end
    end
  end
end
return applied
