"""The Redis store's Lua scripts, each one atomic change on the server (loaded by
``gateway.store.redis.store``). Every multi-key change is one script, so a reservation can
never admit past a limit, and the totals move with the entries they count."""

# KEYS: none (prefix in ARGV[1]); ARGV: prefix, key, hash, type, params, scope, data, size,
# created_at, max_bytes, reservation id to settle (or "")
# Removes one entry and everything that indexes it; returns the bytes it freed (0 if absent).
DROP = """
local function drop(p, victim)
  local vkey = p .. 'r:' .. victim
  local v = redis.call('HMGET', vkey, 'size', 'content_hash', 'type')
  redis.call('ZREM', p .. 'lru', victim)
  redis.call('ZREM', p .. 'created', victim)
  if not v[1] then return 0 end
  redis.call('HINCRBY', p .. 'totals', 'entries', -1)
  redis.call('HINCRBY', p .. 'totals', 'bytes', -tonumber(v[1]))
  redis.call('SREM', p .. 'h:' .. v[2], victim)
  redis.call('SREM', p .. 't:' .. v[3], victim)
  redis.call('DEL', vkey)
  return tonumber(v[1])
end
"""

SAVE = (
    DROP
    + """
local p, key = ARGV[1], ARGV[2]
local rkey = p .. 'r:' .. key
local size = tonumber(ARGV[8])
local old = redis.call('HGET', rkey, 'size')
if old then
  redis.call('HINCRBY', p .. 'totals', 'bytes', size - tonumber(old))
else
  redis.call('HINCRBY', p .. 'totals', 'entries', 1)
  redis.call('HINCRBY', p .. 'totals', 'bytes', size)
end
redis.call('HSET', rkey, 'content_hash', ARGV[3], 'type', ARGV[4], 'params', ARGV[5],
           'scope', ARGV[6], 'data', ARGV[7], 'size', size, 'created_at', ARGV[9])
redis.call('SADD', p .. 'h:' .. ARGV[3], key)
redis.call('SADD', p .. 't:' .. ARGV[4], key)
redis.call('ZADD', p .. 'lru', ARGV[9], key)
redis.call('ZADD', p .. 'created', ARGV[9], key)
if ARGV[11] ~= '' then
  local payload = redis.call('HGET', p .. 'resv', ARGV[11])
  if payload then
    redis.call('HDEL', p .. 'resv', ARGV[11])
    local a = string.find(payload, '|', 1, true)
    local b = string.find(payload, '|', a + 1, true)
    local c = string.find(payload, '|', b + 1, true)
    redis.call('SREM', p .. 'resv_of:' .. string.sub(payload, b + 1, c - 1), ARGV[11])
  elseif redis.call('EXISTS', p .. 'done:' .. ARGV[11]) == 0 then
    redis.call('HINCRBY', p .. 'used:' .. ARGV[13], ARGV[12], 1)  -- lost by the store: recharge
  end
  redis.call('SET', p .. 'done:' .. ARGV[11], 'settle', 'EX', 604800)
end
local excess = tonumber(redis.call('HGET', p .. 'totals', 'bytes')) - tonumber(ARGV[10])
while excess > 0 do
  local victims = redis.call('ZRANGE', p .. 'lru', 0, 63)
  local progressed = false
  for _, victim in ipairs(victims) do
    if victim ~= key and excess > 0 then
      excess = excess - drop(p, victim)
      progressed = true
    end
  end
  if not progressed then break end
end
return 1
"""
)

DELETE = (
    DROP
    + """
local n = 0
for i = 2, #ARGV do
  if drop(ARGV[1], ARGV[i]) > 0 then n = n + 1 end
end
return n
"""
)

# Reservations are idempotent by id: a reserve or an ending sent twice (a retry after a
# dropped connection) acts once. An ended reservation leaves a tombstone done:<id> for a week.
# KEYS: none (prefix in ARGV[1]); ARGV: prefix, team, period, limit, id, owner
RESERVE = """
local p, team, period, id, owner = ARGV[1], ARGV[2], ARGV[3], ARGV[5], ARGV[6]
local ukey = p .. 'used:' .. period
if redis.call('HEXISTS', p .. 'resv', id) == 1 or redis.call('EXISTS', p .. 'done:' .. id) == 1 then
  return tonumber(redis.call('HGET', ukey, team) or '0')
end
local used = tonumber(redis.call('HGET', ukey, team) or '0')
if used >= tonumber(ARGV[4]) then return -1 end
used = redis.call('HINCRBY', ukey, team, 1)
redis.call('HSET', p .. 'resv', id, team .. '|' .. period .. '|' .. owner .. '|0')
redis.call('SADD', p .. 'resv_of:' .. owner, id)
return used
"""

# ARGV: prefix, id
MARK_SENT = """
local payload = redis.call('HGET', ARGV[1] .. 'resv', ARGV[2])
if not payload then return 0 end
if string.sub(payload, -2) == '|0' then
  redis.call('HSET', ARGV[1] .. 'resv', ARGV[2], string.sub(payload, 1, -2) .. '1')
end
return 1
"""

# Ends reservations. ARGV: prefix, mode, team, period, id... ; mode is
#   settle       charged, delivered
#   undelivered  charged, sent but no result delivered
#   refund       given back
#   reclaim      its owner is gone: refund if never sent, else undelivered
# A settle or undelivered of an id that is neither pending nor ended (the store lost it,
# e.g. a restart without persistence) charges it again: a call that was sent stays charged.
# Returns {refunded, undelivered, ended}.
END = """
local p, mode = ARGV[1], ARGV[2]
local refunded, undelivered, ended = 0, 0, 0
for i = 5, #ARGV do
  local id = ARGV[i]
  local payload = redis.call('HGET', p .. 'resv', id)
  local team, period, sent
  if payload then
    local a = string.find(payload, '|', 1, true)
    local b = string.find(payload, '|', a + 1, true)
    local c = string.find(payload, '|', b + 1, true)
    team, period = string.sub(payload, 1, a - 1), string.sub(payload, a + 1, b - 1)
    sent = string.sub(payload, c + 1)
    redis.call('HDEL', p .. 'resv', id)
    redis.call('SREM', p .. 'resv_of:' .. string.sub(payload, b + 1, c - 1), id)
  elseif (mode == 'settle' or mode == 'undelivered')
      and redis.call('EXISTS', p .. 'done:' .. id) == 0 then
    team, period, sent = ARGV[3], ARGV[4], '1'
    redis.call('HINCRBY', p .. 'used:' .. period, team, 1)
  end
  if team then
    local how = mode
    if mode == 'reclaim' then how = (sent == '1') and 'undelivered' or 'refund' end
    if how == 'refund' then
      local key = p .. 'used:' .. period
      if tonumber(redis.call('HGET', key, team) or '0') > 0 then
        redis.call('HINCRBY', key, team, -1)
      end
      refunded = refunded + 1
    elseif how == 'undelivered' then
      redis.call('HINCRBY', p .. 'undelivered:' .. period, team, 1)
      undelivered = undelivered + 1
    end
    redis.call('SET', p .. 'done:' .. id, how, 'EX', 604800)
    ended = ended + 1
  end
end
return {refunded, undelivered, ended}
"""


# The results of one image, type and scope in one round trip (the image's index set is small).
# ARGV: prefix, content_hash, type, scope; returns key, then _FIELDS, per result.
RESULTS_OF_TYPE = """
local p = ARGV[1]
local out = {}
for _, key in ipairs(redis.call('SMEMBERS', p .. 'h:' .. ARGV[2])) do
  local v = redis.call('HMGET', p .. 'r:' .. key,
                       'content_hash', 'type', 'params', 'scope', 'data', 'created_at')
  if v[1] and v[2] == ARGV[3] and v[4] == ARGV[4] then
    table.insert(out, key)
    for i = 1, 6 do table.insert(out, v[i]) end
  end
end
return out
"""


# One team's token bucket, shared by every replica: rl:<team> hash tokens, stamp (the server's
# clock: one for all replicas), rate, burst; it expires once it would be full again.
# KEYS: the bucket; ARGV: rate, burst; returns {taken (0/1), tokens left as text}.
TAKE_TOKEN = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v = redis.call('HMGET', KEYS[1], 'tokens', 'stamp', 'rate', 'burst')
local tokens, stamp = tonumber(v[1]), tonumber(v[2])
if not tokens or not stamp or v[3] ~= ARGV[1] or v[4] ~= ARGV[2] then
  tokens, stamp = burst, now
end
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local taken = 0
if tokens >= 1 then
  tokens = tokens - 1
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'stamp', string.format('%.17g', now), 'rate', ARGV[1], 'burst', ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return {taken, string.format('%.17g', tokens)}
"""


# The lock on a key in flight, fl:<key> = the holder's token (docs: "Coalescing across
# replicas"). A claim resent after a dropped connection finds its own token and holds.
# KEYS: the lock; ARGV: token, ttl ms.
CLAIM_FLIGHT = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if v then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

RENEW_FLIGHT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

RELEASE_FLIGHT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


# Store-issued team keys: apikeys id -> JSON definition, apikey_uses id -> count,
# apikey_used_at id -> last use; meta keys_generation changes with every definition.
# ARGV: prefix, id, definition, generation.
SAVE_KEY = """
redis.call('HSET', ARGV[1] .. 'apikeys', ARGV[2], ARGV[3])
redis.call('HSET', ARGV[1] .. 'meta', 'keys_generation', ARGV[4])
return 1
"""

# ARGV: prefix, then (id, uses, last use) per key; ids not in apikeys are skipped.
KEY_USES = """
local p = ARGV[1]
for i = 2, #ARGV, 3 do
  if redis.call('HEXISTS', p .. 'apikeys', ARGV[i]) == 1 then
    redis.call('HINCRBY', p .. 'apikey_uses', ARGV[i], ARGV[i + 1])
    local old = redis.call('HGET', p .. 'apikey_used_at', ARGV[i])
    if not old or tonumber(old) < tonumber(ARGV[i + 2]) then
      redis.call('HSET', p .. 'apikey_used_at', ARGV[i], ARGV[i + 2])
    end
  end
end
return 1
"""
