-- Apply a batch's summed learner updates to item-level state (models.learners.ItemDelta).
--
-- KEYS: for each item: nbr (ZSET neighbour -> log2 co-occurrence sum), stats (HASH: n = log2
--       click sum, e/c[|segment] = log2 bandit sums, segments = how many segments have sums,
--       wm:<topic:partition> = last applied offset), as in apply_item_facts.lua
-- ARGV: max_neighbours, ttl_ms, max_segments, now_ms, refresh_ms, then for each item:
--         s (sources), s times: source, lowest offset, highest offset;
--         f (fields), f times: field, x;   p (pairs), p times: neighbour, x
--       x: a log2 sum, added to the field (or the pair) in log2 space.
-- An item is applied whole when every range lies above its watermark for that source, skipped
-- when every range lies at or below it (a redelivery), and left untouched otherwise: its
-- index (0-based) is returned, and the caller sends that item's records one by one
-- (apply_item_facts.lua), which skips exactly those below the watermark.
-- Bounds, as apply_item_facts.lua: the neighbour list is cut to its max_neighbours strongest
-- once per item per call (weakest first, ties by member), a new segment is admitted while the
-- item has fewer than max_segments (in the order of the fields), both keys expire ttl_ms
-- after an update (0: never), to within refresh_ms: the expiries are set again only once the
-- last setting (stats field "ex", the caller's clock) is refresh_ms old.
-- Returns {applied, skipped, index of each item left untouched ...}.
local max_nb = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local max_seg = tonumber(ARGV[3])
local now = tonumber(ARGV[4])       -- the caller's wall clock, ms
local refresh = tonumber(ARGV[5])   -- expiries are set again once this much older, ms
local BULK = 1000  -- members per ZMSCORE/ZADD (Lua's unpack is limited to a few thousand values)

-- @include log_space.lua


local a = 6
local applied, skipped = 0, 0
local out = {0, 0}
for i = 0, (#KEYS / 2) - 1 do
  local nbr, stats = KEYS[i * 2 + 1], KEYS[i * 2 + 2]
  local s = tonumber(ARGV[a]); a = a + 1
  local srcs, lows, highs, wmf = {}, {}, {}, {}
  for k = 1, s do
    srcs[k], lows[k], highs[k] = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    wmf[k] = 'wm:' .. ARGV[a]
    a = a + 3
  end
  local f = tonumber(ARGV[a]); a = a + 1
  local fields = a; a = a + 2 * f
  local p = tonumber(ARGV[a]); a = a + 1
  local pairs_at = a; a = a + 2 * p

  -- One read: the watermarks, when the expiries were set, the segment count, every field
  -- and the sibling of each segment field (its segment may have sums under the other kind).
  local names = {'ex', 'segments'}
  for k = 1, s do names[#names + 1] = wmf[k] end
  for k = 0, f - 1 do
    local field = ARGV[fields + 2 * k]
    names[#names + 1] = field
    if string.sub(field, 2, 2) == '|' then
      names[#names + 1] = (string.sub(field, 1, 1) == 'e' and 'c' or 'e') .. string.sub(field, 2)
    end
  end
  local got = redis.call('HMGET', stats, unpack(names))
  local fresh, stale = 0, 0
  for k = 1, s do
    local wm = tonumber(got[2 + k] or '-1')
    if lows[k] > wm then fresh = fresh + 1 elseif highs[k] <= wm then stale = stale + 1 end
  end
  if stale == s then
    skipped = skipped + 1
  elseif fresh < s then
    out[#out + 1] = i
  else
    applied = applied + 1
    local writes = {}
    for k = 1, s do
      writes[#writes + 1] = wmf[k]
      writes[#writes + 1] = highs[k]
    end
    -- Expiries are set again only once they are `refresh` old (a small part of ttl), so a
    -- key expires between ttl - refresh and ttl after the item's last update; a key this call
    -- creates gets one at once.
    local ex = tonumber(got[1] or '')
    local renew = ttl > 0 and (not ex or math.abs(now - ex) >= refresh)
    if renew then
      writes[#writes + 1] = 'ex'
      writes[#writes + 1] = now
    end
    if f > 0 then
      local cur = {}
      for k = 3 + s, #names do cur[names[k]] = got[k] end
      local count = tonumber(got[2] or '0')
      local counted = count
      local admitted = {}  -- segments written in this call
      for k = 0, f - 1 do
        local field, x = ARGV[fields + 2 * k], tonumber(ARGV[fields + 2 * k + 1])
        local ok = true
        if string.sub(field, 2, 2) == '|' then
          local segment = string.sub(field, 3)
          local sibling = (string.sub(field, 1, 1) == 'e' and 'c' or 'e') .. string.sub(field, 2)
          if not (cur[field] or cur[sibling] or admitted[segment]) then
            if count < max_seg then count = count + 1 else ok = false end
          end
          if ok then admitted[segment] = true end
        end
        if ok then
          writes[#writes + 1] = field
          writes[#writes + 1] = fmt(log_add(cur[field] and tonumber(cur[field]), x))
        end
      end
      if count ~= counted then
        writes[#writes + 1] = 'segments'
        writes[#writes + 1] = count
      end
    end
    redis.call('HSET', stats, unpack(writes))
    local added = 0
    if p > 0 then
      for lo = 0, p - 1, BULK do
        local hi = math.min(p - 1, lo + BULK - 1)
        local members = {}
        for k = lo, hi do members[#members + 1] = ARGV[pairs_at + 2 * k] end
        local scores = redis.call('ZMSCORE', nbr, unpack(members))
        local adds = {}
        for k = lo, hi do
          local c = scores[k - lo + 1]
          adds[#adds + 1] = fmt(log_add(c and tonumber(c), tonumber(ARGV[pairs_at + 2 * k + 1])))
          adds[#adds + 1] = members[k - lo + 1]
        end
        added = added + redis.call('ZADD', nbr, unpack(adds))
      end
      if added > 0 then  -- only new neighbours can take the list past its bound
        local size = redis.call('ZCARD', nbr)
        if size > max_nb then redis.call('ZREMRANGEBYRANK', nbr, 0, size - max_nb - 1) end
        if ttl > 0 and size == added and not renew then redis.call('PEXPIRE', nbr, ttl) end  -- a new key
      end
    end
    if renew then
      redis.call('PEXPIRE', nbr, ttl)
      redis.call('PEXPIRE', stats, ttl)
    end
  end
end
out[1], out[2] = applied, skipped
return out
