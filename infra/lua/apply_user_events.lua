-- Apply clicks and impressions of one or more users, idempotently.
--
-- KEYS: for each user, in order: seq (ZSET), meta (HASH), seen (ZSET), facts (ZSET),
--       reqs (HASH), reqidx (ZSET)  (see infra/keys.py)
-- ARGV: max_len, gap_ms, dedupe_window, cf_window, attribution_ms, max_requests, facts_span,
--       horizon_ms, ttl_ms, facts_ttl_ms, now_ms (the caller's clock), refresh_ms,
--       then for each user: n, then n times: kind ("c" click | "i" impression), event_id,
--       item, ts_ms, offset, request_id, segment, shown ("item<US>pos<US>..." for impressions),
--       facts_floor (the offset below which the event's partition is fully applied)
-- Returns a flat array: for each event, status, the offset it was first seen at, and the
-- facts the event yields for the learners (a string, see models/session.py).
--   status 1 applied, 0 redelivered (same id, same offset: no-op; its facts are returned
--          again while its offset is at or above facts_floor and within facts_span of the
--          user's newest; below facts_floor it yields "D", models.session.FACTS_DONE:
--          its learner updates were applied, nothing to send again),
--          -1 duplicate (same id, another earlier offset: rejected),
--           2 superseded (same id at a later offset was applied first: replaced by this one)
--
-- The sequence is the top max_len (event time, member) pairs of every click ever applied, so
-- the result does not depend on arrival order or repetition. meta is derived from it:
-- session_start/session_len describe the run of events that ends at the latest event with
-- no gap above gap_ms.
--
-- Bounds (README "State in Redis"): facts below the floor are dropped; a request's join state
-- is dropped once the user's newest event time (meta newest_ts) is horizon_ms past the
-- request's time, and beyond the newest max_requests; every key of a user that has an event
-- in the call expires ttl_ms after it (0: never) to within refresh_ms (the expiries are set
-- again once the last setting, meta field "ex", is refresh_ms old), the facts key
-- facts_ttl_ms after it (at most ttl_ms; 0: as the others; set on every call).
local max_len = tonumber(ARGV[1])
local gap = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local cf_window = tonumber(ARGV[4])
local attribution = tonumber(ARGV[5])
local max_requests = tonumber(ARGV[6])
local facts_span = tonumber(ARGV[7])
local horizon = tonumber(ARGV[8])
local ttl = tonumber(ARGV[9])
local facts_ttl = tonumber(ARGV[10])
local now = tonumber(ARGV[11])      -- the caller's wall clock, ms
local refresh = tonumber(ARGV[12])  -- the user keys' expiries are set again once this much older, ms
if facts_ttl == 0 or (ttl > 0 and ttl < facts_ttl) then facts_ttl = ttl end  -- never past the session
local out = {}
local a = 13
local US, RS = '\31', '\30'

local function split(s)
  local parts = {}
  if s == nil or s == '' then return parts end
  local from = 1
  while true do
    local at = string.find(s, US, from, true)
    if not at then parts[#parts + 1] = string.sub(s, from); return parts end
    parts[#parts + 1] = string.sub(s, from, at - 1)
    from = at + 1
  end
end

-- Keep the join state of the last max_requests requests (by first event time).
local function trim_requests(reqs, reqidx)
  local excess = redis.call('ZCARD', reqidx) - max_requests
  if excess > 0 then
    for _, old in ipairs(redis.call('ZRANGE', reqidx, 0, excess - 1)) do
      redis.call('HDEL', reqs, old, 'c:' .. old)
    end
    redis.call('ZREMRANGEBYRANK', reqidx, 0, excess - 1)
  end
end

-- A record's facts are kept in pieces of at most CHUNK bytes, members "<offset>:<piece> RS
-- <bytes>" scored by the offset: small members keep the set in Redis's compact listpack
-- encoding (members up to 64 bytes), about a fifth of the memory of one long member.
local CHUNK = 40

local function keep_facts(factlog, off, facts)
  redis.call('ZREMRANGEBYSCORE', factlog, off, off)  -- an offset applied again (its id had left the window)
  local args = {}
  for k = 0, math.max(1, math.ceil(#facts / CHUNK)) - 1 do
    args[#args + 1] = off
    args[#args + 1] = string.format('%d:%05d', off, k) .. RS .. string.sub(facts, k * CHUNK + 1, (k + 1) * CHUNK)
    if #args >= 200 then redis.call('ZADD', factlog, unpack(args)); args = {} end
  end
  if #args > 0 then redis.call('ZADD', factlog, unpack(args)) end
end

-- The facts kept for a record, or nil (pieces of one score come in member order).
local function kept_facts(factlog, off)
  local rows = redis.call('ZRANGEBYSCORE', factlog, off, off)
  if #rows == 0 then return nil end
  for r = 1, #rows do rows[r] = string.sub(rows[r], string.find(rows[r], RS, 1, true) + 1) end
  return table.concat(rows)
end

-- Forget the join state of requests older than before_ts.
local function forget_requests(reqs, reqidx, before_ts)
  local old = redis.call('ZRANGEBYSCORE', reqidx, '-inf', '(' .. before_ts)
  if #old > 0 then
    for _, rid in ipairs(old) do redis.call('HDEL', reqs, rid, 'c:' .. rid) end
    redis.call('ZREMRANGEBYSCORE', reqidx, '-inf', '(' .. before_ts)
  end
end

-- Facts of a click: the items before it (the learners' co-occurrence window) and, when it
-- answers a known impression within the attribution window, a click feedback.
local function click_facts(seq, reqs, reqidx, eid, item, ts, rid, seg)
  local facts = {'C'}  -- the click itself: tells "no facts kept" apart from "no window"
  local member = item .. '|' .. eid
  local rows = redis.call('ZREVRANGEBYSCORE', seq, ts, ts - gap, 'WITHSCORES', 'LIMIT', 0, cf_window + 1)
  local taken = 0
  for r = 1, #rows, 2 do
    if rows[r] ~= member and taken < cf_window then
      local bar = string.find(rows[r], '|', 1, true)
      facts[#facts + 1] = 'W' .. US .. string.sub(rows[r], 1, bar - 1) .. US .. rows[r + 1]
      taken = taken + 1
    end
  end
  if rid ~= '' then
    local clicked = redis.call('HGET', reqs, 'c:' .. rid) or ''
    local already = false
    local prior = split(clicked)
    for c = 1, #prior, 2 do if prior[c] == item then already = true end end
    if not already then
      redis.call('HSET', reqs, 'c:' .. rid, clicked == '' and (item .. US .. ts) or (clicked .. US .. item .. US .. ts))
      if redis.call('ZSCORE', reqidx, rid) == false then
        redis.call('ZADD', reqidx, ts, rid)
        trim_requests(reqs, reqidx)
      end
      local imp = split(redis.call('HGET', reqs, rid) or '')
      if #imp > 0 then
        local its = tonumber(imp[1])
        if ts >= its and ts - its <= attribution then
          for s2 = 3, #imp, 2 do
            if imp[s2] == item then
              facts[#facts + 1] = 'K' .. US .. item .. US .. imp[s2 + 1] .. US .. imp[1] .. US .. imp[2]
              break
            end
          end
        end
      end
    end
  end
  return facts
end

-- Facts of an impression: one exposure per shown item, and the clicks on this request that
-- arrived before it (out of order) within the attribution window.
local function impression_facts(reqs, reqidx, ts, rid, seg, shown)
  local facts = {}
  local repeated = redis.call('HEXISTS', reqs, rid) == 1  -- a retried impression
  redis.call('HSET', reqs, rid, ts .. US .. seg .. (shown ~= '' and (US .. shown) or ''))
  redis.call('ZADD', reqidx, ts, rid)  -- an impression's time wins over an earlier click's
  local list = split(shown)
  for s2 = 1, #list, 2 do
    facts[#facts + 1] = 'S' .. US .. list[s2] .. US .. list[s2 + 1] .. US .. ts .. US .. seg
  end
  local prior = repeated and {} or split(redis.call('HGET', reqs, 'c:' .. rid) or '')
  for c = 1, #prior, 2 do
    local cts = tonumber(prior[c + 1])
    if cts >= ts and cts - ts <= attribution then
      for s2 = 1, #list, 2 do
        if list[s2] == prior[c] then
          facts[#facts + 1] = 'K' .. US .. prior[c] .. US .. list[s2 + 1] .. US .. ts .. US .. seg
          break
        end
      end
    end
  end
  trim_requests(reqs, reqidx)
  return facts
end

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

for u = 0, (#KEYS / 6) - 1 do
  local seq, meta, seen = KEYS[u * 6 + 1], KEYS[u * 6 + 2], KEYS[u * 6 + 3]
  local factlog, reqs, reqidx = KEYS[u * 6 + 4], KEYS[u * 6 + 5], KEYS[u * 6 + 6]
  local n = tonumber(ARGV[a]); a = a + 1
  local m = redis.call('HMGET', meta, 'last_ts', 'session_start', 'session_len', 'newest_ts', 'ex')
  local last, start, len = tonumber(m[1]), tonumber(m[2]), tonumber(m[3]) or 0
  local newest = tonumber(m[4])
  local newest_was = newest
  local ex = tonumber(m[5])  -- when the expiries were last set (the caller's clock)
  -- join state exists only for users who sent a request id: skip its upkeep for the others
  local joins = redis.call('EXISTS', reqidx) == 1
  local joined = joins      -- the join keys existed before this call
  local created = false     -- a sequence or dedupe key this call created (it needs an expiry now)
  local clean = 0          -- no fact below this offset is kept (offsets start at 0)
  local dirty = false      -- meta needs a full recompute
  local changed = false    -- meta fields need writing
  local clicks, imps = 0, 0
  for _ = 1, n do
    local kind, eid, item, ts, off = ARGV[a], ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
    local rid, seg, shown, floor = ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], tonumber(ARGV[a + 8])
    a = a + 9
    local facts = nil
    if floor > clean then
      redis.call('ZREMRANGEBYSCORE', factlog, '-inf', '(' .. floor)
      clean = floor
    end
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
      local seen_size = redis.call('ZCARD', seen)
      if seen_size > window then
        redis.call('ZREMRANGEBYRANK', seen, 0, -(window + 1))
      elseif seen_size == 1 then
        created = true
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
        elseif size == 1 then
          created = true
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
      if status == 1 then
        if rid ~= '' then joins = true end
        if kind == 'c' then
          facts = click_facts(seq, reqs, reqidx, eid, item, ts, rid, seg)
        else
          facts = impression_facts(reqs, reqidx, ts, rid, seg, shown)
        end
        facts = table.concat(facts, RS)
        keep_facts(factlog, off, facts)
        -- Kept by offset, not by count: a redelivered batch can hold any number of one
        -- user's events, and each must find its facts again.
        redis.call('ZREMRANGEBYSCORE', factlog, '-inf', '(' .. (off - facts_span))
        if off < clean then clean = off end
        -- Join state ages with the user's newest event: only when that moved, or when this
        -- (late) event may have left a request older than the horizon, is there anything
        -- to forget.
        if newest == nil or ts > newest then newest = ts end
        if joins and (newest == ts or ts < newest - horizon) then
          forget_requests(reqs, reqidx, newest - horizon)
        end
      end
    elseif status == 0 then
      if off < floor then
        facts = 'D'
      else
        facts = kept_facts(factlog, off)
      end
    end
    out[#out + 1] = status
    out[#out + 1] = prev
    out[#out + 1] = facts or ''
  end
  local moved = newest ~= newest_was
  -- Expiries are set again only once they are `refresh` old (a small part of ttl): a user's
  -- keys expire between ttl - refresh and ttl after its last event. Keys this call created get
  -- theirs at once (join keys, a first sequence or dedupe entry).
  local renew = n > 0 and ttl > 0 and (not ex or math.abs(now - ex) >= refresh)
  local writes = {}
  if dirty then
    recompute(seq, meta)
  elseif changed then
    writes = {'last_ts', last, 'session_start', start, 'session_len', len}
  end
  if moved then
    writes[#writes + 1] = 'newest_ts'
    writes[#writes + 1] = newest
  end
  if renew then
    writes[#writes + 1] = 'ex'
    writes[#writes + 1] = now
  end
  if #writes > 0 then redis.call('HSET', meta, unpack(writes)) end
  if clicks > 0 then redis.call('HINCRBY', meta, 'clicks', clicks) end
  if imps > 0 then redis.call('HINCRBY', meta, 'impressions', imps) end
  if n > 0 then
    if ttl > 0 and (renew or created) then
      redis.call('PEXPIRE', seq, ttl)
      redis.call('PEXPIRE', meta, ttl)
      redis.call('PEXPIRE', seen, ttl)
    end
    if ttl > 0 and joins and (renew or not joined) then
      redis.call('PEXPIRE', reqs, ttl)
      redis.call('PEXPIRE', reqidx, ttl)
    end
    if facts_ttl > 0 then redis.call('PEXPIRE', factlog, facts_ttl) end
  end
end
return out
