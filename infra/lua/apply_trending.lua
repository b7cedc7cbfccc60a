-- Apply trending updates: a decayed click sum per item (log2, forward decay) and, for items
-- whose category is known, the same score in that category's sorted set.
--
-- KEYS[1] all (ZSET item -> log2 sum), KEYS[2] meta (HASH: cat:<item> = category,
--         wm:<topic:partition>|<bucket> = last applied offset of that source for the items of
--         that bucket), KEYS[2 + k] the sorted set of the k-th category named in ARGV (every
--         key the script writes is passed in KEYS)
-- ARGV: max_items, m, then m category names (in KEYS order),
--       then n, then n times: source, offset, op, item, value, bucket  (one record each, in
--         offset order per source);  op "c": a click, value = log2 contribution;  op "i":
--         catalog record, value = category ("" for none)
--       then g, then g times (a bucket's clicks, summed per item): bucket, how many records
--         are behind the group, s, s times: source,
--         lowest offset, highest offset; then k, k times: item, x (log2 sum of its clicks)
-- Items fall in a fixed number of buckets (by a hash of the item, chosen by the caller); each
-- bucket has its own watermark per source, so a batch's buckets can go in separate calls and
-- each call is idempotent on its own. A record is applied when its offset is above its
-- bucket's watermark; a summed group when every range lies above it (skipped when every range
-- lies at or below it, left untouched otherwise: the bucket is returned, and the caller sends
-- its clicks one by one). A watermark field without "|<bucket>" (written before buckets) is the
-- floor of every bucket that has none of its own.
-- Each sorted set keeps its max_items highest scores, cut once per call (the lowest dropped);
-- an item dropped from the global set but kept in its category's continues from the latter.
-- Returns {'ok', records applied, bucket left untouched ...}, or {'missing', category,
-- ...} without writing anything when a category the ops touch (an item's current one, or a new
-- one) has no key in KEYS: the caller passes those keys too and calls again.
local all, meta = KEYS[1], KEYS[2]
local max_items = tonumber(ARGV[1])
local m = tonumber(ARGV[2])
local cat_key = {}
for k = 1, m do cat_key[ARGV[2 + k]] = KEYS[2 + k] end
local n = tonumber(ARGV[m + 3])
local first = m + 4
local groups_at = first + 6 * n
local g = tonumber(ARGV[groups_at])
local BULK = 1000  -- members per bulk call (Lua's unpack is limited to a few thousand values)

-- The summed groups, parsed once; and every item the call touches.
local groups = {}
local items = {}
local a = groups_at + 1
for j = 1, g do
  local group = {bucket = ARGV[a], records = tonumber(ARGV[a + 1]), sources = {}, items = {}, xs = {}}
  local s = tonumber(ARGV[a + 2]); a = a + 3
  for k = 1, s do
    group.sources[k] = {ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])}
    a = a + 3
  end
  local c = tonumber(ARGV[a]); a = a + 1
  for k = 1, c do
    group.items[k], group.xs[k] = ARGV[a], tonumber(ARGV[a + 1])
    items[#items + 1] = ARGV[a]
    a = a + 2
  end
  groups[j] = group
end
a = first
for _ = 1, n do
  items[#items + 1] = ARGV[a + 3]
  a = a + 6
end

-- Current categories of every item touched, in bulk reads; a missing key is named, not written.
local category = {}
for lo = 1, #items, BULK do
  local fields = {}
  for k = lo, math.min(#items, lo + BULK - 1) do fields[#fields + 1] = 'cat:' .. items[k] end
  local got = redis.call('HMGET', meta, unpack(fields))
  for k = 1, #fields do
    if got[k] then category[items[lo + k - 1]] = got[k] end
  end
end
local missing = {}
for _, cat in pairs(category) do
  if not cat_key[cat] then missing[cat] = true end
end
a = first
for _ = 1, n do
  local op, value = ARGV[a + 2], ARGV[a + 4]
  if op == 'i' and value ~= '' and not cat_key[value] then missing[value] = true end
  a = a + 6
end
if next(missing) then
  local out = {'missing'}
  for cat in pairs(missing) do out[#out + 1] = cat end
  return out
end

local applied = 0
local touched = {}  -- sorted sets written (cut to max_items at the end)

-- @include log_space.lua


local legacy = {}  -- source -> its watermark from before buckets (or -1)
local function watermark(source, bucket)
  local field = 'wm:' .. source .. '|' .. bucket
  local wm = redis.call('HGET', meta, field)
  if wm then return tonumber(wm), field end
  if legacy[source] == nil then legacy[source] = tonumber(redis.call('HGET', meta, 'wm:' .. source) or '-1') end
  return legacy[source], field
end

-- A score for an item in the global set (and its category's).
local function current(item)
  local cur = redis.call('ZSCORE', all, item)
  local cat = category[item]
  if not cur and cat then cur = redis.call('ZSCORE', cat_key[cat], item) end
  return cur
end

-- 1. Records one by one: catalog records, and clicks of buckets the caller sends that way.
a = first
for _ = 1, n do
  local source, offset, op, item, value, bucket = ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  a = a + 6
  local wm, field = watermark(source, bucket)
  if offset > wm then
    redis.call('HSET', meta, field, offset)
    applied = applied + 1
    local cat = category[item]
    local cur = current(item)
    if op == 'c' then
      local score = fmt(log_add(cur and tonumber(cur), tonumber(value)))
      redis.call('ZADD', all, score, item)
      touched[all] = true
      if cat then
        redis.call('ZADD', cat_key[cat], score, item)
        touched[cat_key[cat]] = true
      end
    elseif cat ~= value then
      if cat then redis.call('ZREM', cat_key[cat], item) end
      if value == '' then
        redis.call('HDEL', meta, 'cat:' .. item)
        category[item] = nil
      else
        redis.call('HSET', meta, 'cat:' .. item, value)
        category[item] = value
        if cur then
          redis.call('ZADD', cat_key[value], cur, item)
          touched[cat_key[value]] = true
        end
      end
    end
  end
end

-- 2. Summed clicks per bucket.
local out = {'ok', 0}
for _, group in ipairs(groups) do
  local fresh, stale, s = 0, 0, #group.sources
  local fields = {}
  for k, src in ipairs(group.sources) do
    local wm, field = watermark(src[1], group.bucket)
    fields[k] = field
    if src[2] > wm then fresh = fresh + 1 elseif src[3] <= wm then stale = stale + 1 end
  end
  if fresh == s then
    applied = applied + group.records
    local marks = {}
    for k, src in ipairs(group.sources) do
      marks[#marks + 1] = fields[k]
      marks[#marks + 1] = src[3]
    end
    redis.call('HSET', meta, unpack(marks))
    local c = #group.items
    for lo = 1, c, BULK do
      local hi = math.min(c, lo + BULK - 1)
      local members = {}
      for k = lo, hi do members[#members + 1] = group.items[k] end
      local scores = redis.call('ZMSCORE', all, unpack(members))
      local adds = {}
      local by_cat = {}
      for k = lo, hi do
        local item = group.items[k]
        local cur = scores[k - lo + 1]
        local cat = category[item]
        if not cur and cat then cur = redis.call('ZSCORE', cat_key[cat], item) end
        local score = fmt(log_add(cur and tonumber(cur), group.xs[k]))
        adds[#adds + 1] = score
        adds[#adds + 1] = item
        if cat then
          local list = by_cat[cat]
          if not list then list = {}; by_cat[cat] = list end
          list[#list + 1] = score
          list[#list + 1] = item
        end
      end
      redis.call('ZADD', all, unpack(adds))
      touched[all] = true
      for cat, list in pairs(by_cat) do
        redis.call('ZADD', cat_key[cat], unpack(list))
        touched[cat_key[cat]] = true
      end
    end
  elseif stale < s then
    out[#out + 1] = group.bucket
  end
end

for key in pairs(touched) do
  local excess = redis.call('ZCARD', key) - max_items
  if excess > 0 then redis.call('ZREMRANGEBYRANK', key, 0, excess - 1) end
end
out[2] = applied
return out
