"""The Redis store's scripts: every change that touches more than one key is one of these, so it
is atomic whatever other replicas do at the same moment.

A scope (a session, an API key) is three keys: its ledger (a hash of settled totals, plus `h_*`
fields summing its open holds), its holds (a hash, call id to `"calls input output cost"`) and its
leases (a sorted set, call id to the hold's expiry in ms). A reservation first sweeps the expired
holds of every scope it checks, so a crashed replica's holds stop counting after their lease.
The admission rule is `_holds.refusal` and `_holds.admit_group`, written again in Lua.
"""

from __future__ import annotations

TOTALS = (
    "calls",
    "failed_calls",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_usd",
    "unpriced_calls",
    "tool_calls",
)
"""The fields of `Totals`, in the order the settle script takes and returns them."""

_COMMON = r"""
local function num(v) return tonumber(v) or 0 end
local function drop_hold(ledger, holds, leases, id)
  local h = redis.call('HGET', holds, id)
  if h then
    local c, a, b, d = string.match(h, '(%S+) (%S+) (%S+) (%S+)')
    -- `0 - x`, not `-x`: Lua writes minus zero as "-0", which HINCRBY refuses.
    redis.call('HINCRBY', ledger, 'h_calls', 0 - tonumber(c))
    redis.call('HINCRBY', ledger, 'h_in', 0 - tonumber(a))
    redis.call('HINCRBY', ledger, 'h_out', 0 - tonumber(b))
    redis.call('HINCRBYFLOAT', ledger, 'h_cost', 0 - tonumber(d))
    redis.call('HDEL', holds, id)
  end
  redis.call('ZREM', leases, id)
end
local function touch(keys, idle)
  for _, key in ipairs(keys) do redis.call('PEXPIRE', key, idle) end
end
"""

RESERVE = (
    _COMMON
    + r"""
-- KEYS: per scope (ledger, holds, leases), the first one the session's; then the session's budget.
-- ARGV: now_ms, lease_ms, idle_ms, scopes, 5 limits per scope ('' for none), holds, then per hold
-- call_id, required (1/0), calls, input, output, cost.
local now, lease, idle, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local names = {'cost_usd', 'input_tokens', 'output_tokens', 'total_tokens', 'calls'}
local limits, pos = {}, 5
for i = 1, n do
  local l = {}
  for j = 1, 5 do
    if ARGV[pos] ~= '' then l[names[j]] = tonumber(ARGV[pos]) end
    pos = pos + 1
  end
  limits[i] = l
end
local own = redis.call('GET', KEYS[3 * n + 1])
if own then
  local doc = cjson.decode(own)
  if doc.v ~= 1 then return redis.error_reply('moa_stream: unknown format in ' .. KEYS[3 * n + 1]) end
  local l, session = {}, doc.budget.session or {}
  for j = 1, 5 do
    local v = session[names[j]]
    if type(v) == 'number' then l[names[j]] = v end
  end
  limits[1] = l
end
local st = {}
for i = 1, n do
  local ledger, holds, leases = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now)) do
    drop_hold(ledger, holds, leases, id)
  end
  local v = redis.call('HMGET', ledger, 'calls', 'input_tokens', 'output_tokens', 'cost_usd',
    'h_calls', 'h_in', 'h_out', 'h_cost')
  st[i] = {num(v[1]), num(v[2]), num(v[3]), num(v[4]), num(v[5]), num(v[6]), num(v[7]), num(v[8])}
end
-- settled and held parts of a limit's amount, with `add` (calls, in, out, cost) admitted before
local function parts(s, name, add)
  if name == 'calls' then return s[1], s[5] + add[1] end
  if name == 'cost_usd' then return s[4], s[8] + add[4] end
  if name == 'input_tokens' then return s[2], s[6] + add[2] end
  if name == 'output_tokens' then return s[3], s[7] + add[3] end
  return s[2] + s[3], s[6] + s[7] + add[2] + add[3]
end
local function breach(add)
  for i = 1, n do
    for _, name in ipairs(names) do
      local t = limits[i][name]
      if t then
        local settled, held = parts(st[i], name, add)
        local used = settled + held
        local over
        if name == 'calls' then over = used + 1 > t else over = used >= t end
        if over then return {i, name, tostring(t), tostring(used), tostring(held)} end
      end
    end
  end
  return nil
end
local count = tonumber(ARGV[pos])
pos = pos + 1
local add, admitted, first, ids = {0, 0, 0, 0}, {}, nil, {}
for k = 1, count do
  local id, required = ARGV[pos], ARGV[pos + 1] == '1'
  local amounts = {tonumber(ARGV[pos + 2]), tonumber(ARGV[pos + 3]), tonumber(ARGV[pos + 4]), tonumber(ARGV[pos + 5])}
  pos = pos + 6
  local b = breach(add)
  if redis.call('HEXISTS', KEYS[2], id) == 1 then
    -- Held already: this is the client's retry of a reservation whose answer was lost.
    redis.call('ZADD', KEYS[3], now + lease, id)
    ids[#ids + 1] = id
  elseif b then
    if required then return {{}, b} end
    first = first or b
  else
    admitted[#admitted + 1] = {id, amounts}
    for j = 1, 4 do add[j] = add[j] + amounts[j] end
  end
end
for _, hold in ipairs(admitted) do
  local id, a = hold[1], hold[2]
  ids[#ids + 1] = id
  for i = 1, n do
    local ledger, holds, leases = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
    redis.call('HSET', holds, id, a[1] .. ' ' .. a[2] .. ' ' .. a[3] .. ' ' .. tostring(a[4]))
    redis.call('ZADD', leases, now + lease, id)
    redis.call('HINCRBY', ledger, 'h_calls', a[1])
    redis.call('HINCRBY', ledger, 'h_in', a[2])
    redis.call('HINCRBY', ledger, 'h_out', a[3])
    redis.call('HINCRBYFLOAT', ledger, 'h_cost', a[4])
  end
end
touch({KEYS[1], KEYS[2], KEYS[3]}, idle)
return {ids, first or {}}
"""
)

SETTLE = (
    _COMMON
    + r"""
-- KEYS: per scope (ledger, holds, leases), the first one the session's; then the session's settled set.
-- ARGV: idle_ms, scopes, call_id, model, role, then the TOTALS amounts of the call.
local idle, n, id, model, role = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
local settled = KEYS[3 * n + 1]
if redis.call('SADD', settled, id) == 0 then return {} end
local fields = {__TOTALS__}
local before = redis.call('HMGET', KEYS[1], unpack(fields))
for i = 1, n do
  local ledger, holds, leases = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  drop_hold(ledger, holds, leases, id)
  local prefixes = {''}
  if i == 1 then prefixes = {'', 'm\31' .. model .. '\31', 'r\31' .. role .. '\31'} end
  for _, prefix in ipairs(prefixes) do
    for j, field in ipairs(fields) do
      local v = ARGV[5 + j]
      if field == 'cost_usd' then
        redis.call('HINCRBYFLOAT', ledger, prefix .. field, v)
      elseif v ~= '0' then
        redis.call('HINCRBY', ledger, prefix .. field, v)
      end
    end
  end
end
local after = redis.call('HMGET', KEYS[1], unpack(fields))
touch({KEYS[1], KEYS[2], KEYS[3], settled}, idle)
return {before, after}
""".replace("__TOTALS__", ", ".join(f"'{name}'" for name in TOTALS))
)

RELEASE = (
    _COMMON
    + r"""
-- KEYS: per scope (ledger, holds, leases). ARGV: scopes, then call ids.
local n = tonumber(ARGV[1])
for k = 2, #ARGV do
  for i = 1, n do drop_hold(KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i], ARGV[k]) end
end
return #ARGV - 1
"""
)

TURN = r"""
-- KEYS: the session's ledger, its settled set. ARGV: idle_ms, turn id.
if redis.call('SADD', KEYS[2], 'turn:' .. ARGV[2]) == 1 then redis.call('HINCRBY', KEYS[1], 'turns', 1) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return 1
"""

CACHE_GET = r"""
-- KEYS: the entry. ARGV: every_n (0 for none). Rerun (a miss) on the n-th use, as the local cache does.
local value = redis.call('HGET', KEYS[1], 'value')
if not value then return false end
local every = tonumber(ARGV[1])
if every > 0 and tonumber(redis.call('HGET', KEYS[1], 'uses') or '1') >= every then
  redis.call('DEL', KEYS[1])
  return false
end
redis.call('HINCRBY', KEYS[1], 'uses', 1)
return value
"""

CACHE_PUT = r"""
-- KEYS: the entry. ARGV: the value, ttl_ms.
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'value', ARGV[1], 'uses', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

BACKGROUND_HOLD = r"""
-- KEYS: the response's registry entry. ARGV: ttl_ms. This process holds the response's call.
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return 1
"""

BACKGROUND_FORGET = r"""
-- KEYS: the registry entry, its handed-over body.
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""

BACKGROUND_REPORT = r"""
-- KEYS: the registry entry, its handed-over body. ARGV: the finished response's body, ttl_ms.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""
