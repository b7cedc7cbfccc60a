-- Apply clicks and impressions of one or more users, idempotently.
--
-- KEYS: for each user, in order: seq (ZSET), meta (HASH), seen (ZSET)  (see infra/keys.py)
-- ARGV: max_len, gap_ms, dedupe_window, then for each user:
--         n, then n times: kind ("c" click | "i" impression), event_id, item, ts_ms, offset
-- Returns a flat array: for each event, status and the offset it was first seen at.
--   status 1 applied, 0 redelivered (same id, same offset: no-op),
--          -1 duplicate (same id, another earlier offset: rejected),
--           2 superseded (same id at a later offset was applied first: replaced by this one)
--
-- The sequence is the top max_len (event time, member) pairs of every click ever applied, so
-- the result does not depend on arrival order or repetition. meta is derived from it:
-- session_start/session_len describe the run of events that ends at the latest event with
-- no gap above gap_ms.
local max_len = tonumber(ARGV[1])
local gap = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local out = {}
local a = 4

local function recompute(seq, meta)
  local last, start, len = nil, nil, 0
  local chunk = 64
  local from = 0
  while true do
    local rows = redis.call('ZREVRANGE', seq, from, from + chunk - 1, 'WITHSCORES')
    if #rows == 0 then break end
    for j = 2, #rows, 2 do
      local t = tonumber(rows[j])
      if last == nil then
        last = t; start = t; len = 1
      elseif start - t > gap then
        redis.call('HSET', meta, 'last_ts', last, 'session_start', start, 'session_len', len)
        return
      else
        start = t; len = len + 1
      end
    end
    if #rows < chunk * 2 then break end
    from = from + chunk
  end
  if last ~= nil then
    redis.call('HSET', meta, 'last_ts', last, 'session_start', start, 'session_len', len)
  else
    redis.call('HDEL', meta, 'last_ts', 'session_start', 'session_len')
  end
end

for u = 0, (#KEYS / 3) - 1 do
  local seq, meta, seen = KEYS[u * 3 + 1], KEYS[u * 3 + 2], KEYS[u * 3 + 3]
  local n = tonumber(ARGV[a]); a = a + 1
  local m = redis.call('HMGET', meta, 'last_ts', 'session_start', 'session_len')
  local last, start, len = tonumber(m[1]), tonumber(m[2]), tonumber(m[3]) or 0
  local dirty = false      -- meta needs a full recompute
  local changed = false    -- meta fields need writing
  local clicks, imps = 0, 0
  for _ = 1, n do
    local kind, eid, item, ts, off = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
    a = a + 5
    local prev = redis.call('ZSCORE', seen, eid)
    local status = 1
    if prev then
      prev = tonumber(prev)
      if prev == off then status = 0 elseif prev < off then status = -1 else status = 2 end
    else
      prev = off
    end
    if status == 1 or status == 2 then
      redis.call('ZADD', seen, off, eid)
      if redis.call('ZCARD', seen) > window then
        redis.call('ZREMRANGEBYRANK', seen, 0, -(window + 1))
      end
      if status == 2 then
        local suffix = '|' .. eid
        for _, member in ipairs(redis.call('ZRANGE', seq, 0, -1)) do
          if string.sub(member, -#suffix) == suffix then redis.call('ZREM', seq, member) end
        end
        if kind == 'c' then
          redis.call('ZADD', seq, ts, item .. suffix)
          redis.call('ZREMRANGEBYRANK', seq, 0, -(max_len + 1))
        end
        dirty = true
      elseif kind == 'c' then
        clicks = clicks + 1
        -- 0 when the member was already there (an id back after leaving the dedupe window):
        -- the sequence did not grow, so the incremental session update does not apply.
        local added = redis.call('ZADD', seq, ts, item .. '|' .. eid)
        if added == 0 then dirty = true end
        local size = redis.call('ZCARD', seq)
        if size > max_len then
          redis.call('ZREMRANGEBYRANK', seq, 0, -(max_len + 1))
          size = max_len
        end
        if not dirty then
          if last == nil or ts >= last then
            -- in order: extend the current session or start a new one
            if last ~= nil and ts - last <= gap then len = len + 1 else start = ts; len = 1 end
            last = ts
            if len > size then
              len = size
              start = tonumber(redis.call('ZRANGE', seq, 0, 0, 'WITHSCORES')[2])
            end
            changed = true
          else
            dirty = true
          end
        end
      else
        imps = imps + 1
      end
    end
    out[#out + 1] = status
    out[#out + 1] = prev
  end
  if dirty then
    recompute(seq, meta)
  elseif changed then
    redis.call('HSET', meta, 'last_ts', last, 'session_start', start, 'session_len', len)
  end
  if clicks > 0 then redis.call('HINCRBY', meta, 'clicks', clicks) end
  if imps > 0 then redis.call('HINCRBY', meta, 'impressions', imps) end
end
return out
