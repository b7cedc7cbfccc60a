-- Log-space arithmetic shared by the learner scripts (models/decay.py is the reference):
-- included where a script says "@include log_space.lua" (infra/state.py `_lua`), since Redis
-- scripts cannot call one another.
local LN2 = math.log(2)

-- log2(2^cur + 2^x); cur nil or false: no sum yet
local function log_add(cur, x)
  if not cur then return x end
  local hi, lo = cur, x
  if lo > hi then hi, lo = x, cur end
  return hi + math.log(1 + 2 ^ (lo - hi)) / LN2
end

-- a double written back exactly (Redis turns a Lua number into 14 digits)
local function fmt(v) return string.format('%.17g', v) end
