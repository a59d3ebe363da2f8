"""Lua scripts: every state change of a job is one atomic script, so a crash between two writes never
leaves a job half-updated (and the AOF records each script as one transaction).

Times are integer milliseconds from Redis' own clock (TIME), so every worker and server agrees on them;
ms values have 13 digits, which Lua's number formatting (%.14g) keeps exact.  ARGV[1] is always the key
prefix and ARGV[2] the job id.
"""

from __future__ import annotations

_PREAMBLE = """
local P, id = ARGV[1], ARGV[2]
local job = P .. ':job:' .. id
local TERMINAL = {succeeded = true, failed = true, cancelled = true}
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function now_us_string()
  local t = redis.call('TIME')
  return t[1] .. string.format('%06d', tonumber(t[2]))
end
-- Move the job to a final state; keys expire after its TTL; workers hear about it on the events channel.
local function finish(state, err)
  local old = redis.call('HGET', job, 'state')
  if (not old) or TERMINAL[old] then return false end
  local now = now_ms()
  local ttl = tonumber(redis.call('HGET', job, 'ttl'))
  local seq = redis.call('HGET', job, 'seq')
  redis.call('HSET', job, 'state', state, 'finished', now, 'error', err, 'expires', now + ttl)
  if state ~= 'cancelled' and redis.call('HGET', job, 'started') == '0' then  -- ended before the keeper marked it
    redis.call('HSET', job, 'started', now)
  end
  redis.call('ZREM', P .. ':jobs:' .. old, id)
  redis.call('ZADD', P .. ':jobs:' .. state, seq, id)
  redis.call('ZADD', P .. ':expiries', now + ttl, id)
  for _, part in ipairs({'', ':results', ':progress', ':attempts'}) do
    redis.call('PEXPIRE', job .. part, ttl)
  end
  local idem = redis.call('HGET', job, 'idem_hash')
  if idem and idem ~= '' then redis.call('PEXPIRE', P .. ':idem:' .. idem, ttl) end
  redis.call('PUBLISH', P .. ':events', 'end ' .. id)
  return true
end
"""

# ARGV: prefix, id, idem_hash ('' for none), ttl_ms, n, task_size, tasks_total, spec, request_hash, model,
#       sampler, priority, format, stream, idempotency key.  Returns the job id (an existing one for a known key).
SUBMIT = _PREAMBLE + """
local idem = ARGV[3]
if idem ~= '' then
  local existing = redis.call('GET', P .. ':idem:' .. idem)
  if existing and redis.call('EXISTS', P .. ':job:' .. existing) == 1 then return existing end
end
local now = now_ms()
local seq = redis.call('INCR', P .. ':seq')
redis.call('HSET', job, 'id', id, 'state', 'queued', 'created', now, 'started', 0, 'finished', 0, 'expires', 0,
  'seq', seq, 'ttl', ARGV[4], 'n', ARGV[5], 'task_size', ARGV[6], 'tasks_total', ARGV[7], 'tasks_done', 0,
  'samples_done', 0, 'retries', 0, 'spec', ARGV[8], 'request_hash', ARGV[9], 'model', ARGV[10],
  'sampler', ARGV[11], 'priority', ARGV[12], 'format', ARGV[13], 'idem_hash', idem, 'idem_key', ARGV[15],
  'error', '')
local enqueued = now_us_string()
for t = 0, tonumber(ARGV[7]) - 1 do
  redis.call('XADD', ARGV[14], '*', 'job', id, 'task', t, 'enqueued', enqueued)
end
redis.call('ZADD', P .. ':jobs:all', seq, id)
redis.call('ZADD', P .. ':jobs:queued', seq, id)
if idem ~= '' then redis.call('SET', P .. ':idem:' .. idem, id) end
return id
"""

# ARGV: prefix, id, task, '1' to return the job's spec too.  Read-only (no fsync on the way to compute):
# a worker asks whether to run the task.  Returns {action, failed attempts so far, last error or the job's
# state, spec or ''}; the worker adds the entry's deliveries (a worker that died counts as an attempt).
START = _PREAMBLE + """
local state = redis.call('HGET', job, 'state')
if not state then return {'gone', 0, '', ''} end
if TERMINAL[state] then return {'skip', 0, state, ''} end
local failed = tonumber(redis.call('HGET', job .. ':attempts', ARGV[3]) or '0')
local spec = ''
if ARGV[4] == '1' then spec = redis.call('HGET', job, 'spec') end
return {'run', failed, redis.call('HGET', job .. ':attempts', 'error:' .. ARGV[3]) or '', spec}
"""

# ARGV: prefix, id, task, payload, samples in the task, stream, group, entry id.
# Store the result once (a task that ran twice keeps its first result), then acknowledge the entry.
STORE = _PREAMBLE + """
local state = redis.call('HGET', job, 'state')
local stored = 0
if state and not TERMINAL[state] then
  stored = redis.call('HSETNX', job .. ':results', ARGV[3], ARGV[4])
  redis.call('HDEL', job .. ':progress', ARGV[3])
  if stored == 1 then
    redis.call('HINCRBY', job, 'samples_done', ARGV[5])
    local done = redis.call('HINCRBY', job, 'tasks_done', 1)
    if done >= tonumber(redis.call('HGET', job, 'tasks_total')) then finish('succeeded', '') end
  end
end
redis.call('XACK', ARGV[6], ARGV[7], ARGV[8])
return stored
"""

# ARGV: prefix, id, task, error, stream, group, entry id, counted ('1': a failed attempt; '0': handed back
# by a stopping worker), earlier deliveries of this entry that did not finish (workers that died).
# Queue the task again at the end of its stream (a new entry) and acknowledge the old one.
RETRY = _PREAMBLE + """
local state = redis.call('HGET', job, 'state')
if state and not TERMINAL[state] then
  redis.call('XADD', ARGV[5], '*', 'job', id, 'task', ARGV[3], 'enqueued', now_us_string())
  redis.call('HDEL', job .. ':progress', ARGV[3])
  local failed = tonumber(ARGV[9])
  if ARGV[8] == '1' then
    failed = failed + 1
    redis.call('HSET', job .. ':attempts', 'error:' .. ARGV[3], ARGV[4])
    redis.call('HINCRBY', job, 'retries', 1)
  end
  if failed > 0 then redis.call('HINCRBY', job .. ':attempts', ARGV[3], failed) end
end
redis.call('XACK', ARGV[5], ARGV[6], ARGV[7])
return 1
"""

# ARGV: prefix, id, task, error, stream, group, entry id, attempts, worker, job error message.
DEAD_LETTER = _PREAMBLE + """
redis.call('XADD', P .. ':dead', 'MAXLEN', '~', 10000, '*', 'job', id, 'task', ARGV[3], 'attempts', ARGV[8],
  'error', ARGV[4], 'worker', ARGV[9], 'stream', ARGV[5], 'entry', ARGV[7])
finish('failed', ARGV[10])
redis.call('XACK', ARGV[5], ARGV[6], ARGV[7])
return 1
"""

# ARGV: prefix, id.  Returns 0 for an unknown job, 1 otherwise (a finished job stays as it is).
CANCEL = _PREAMBLE + """
if redis.call('EXISTS', job) == 0 then return 0 end
finish('cancelled', 'cancelled by a client')
return 1
"""

# ARGV: prefix, id, task, "step steps samples", unix ms when the task started.  Marks a queued job running
# (off the task's critical path: the keeper sends it within 0.25 s of the start); unfinished jobs only, so no
# key outlives its job's TTL.
PROGRESS = _PREAMBLE + """
local state = redis.call('HGET', job, 'state')
if state == 'queued' then
  redis.call('HSET', job, 'state', 'running', 'started', ARGV[5])
  local seq = redis.call('HGET', job, 'seq')
  redis.call('ZREM', P .. ':jobs:queued', id)
  redis.call('ZADD', P .. ':jobs:running', seq, id)
  state = 'running'
end
if state == 'running' then
  redis.call('HSET', job .. ':progress', ARGV[3], ARGV[4])
end
return 1
"""

# ARGV: prefix, ''.  Drop expired jobs from the job sets (their keys expired on their own).
PRUNE = _PREAMBLE + """
local ids = redis.call('ZRANGEBYSCORE', P .. ':expiries', '-inf', now_ms(), 'LIMIT', 0, 1000)
for _, old in ipairs(ids) do
  for _, state in ipairs({'all', 'queued', 'running', 'succeeded', 'failed', 'cancelled'}) do
    redis.call('ZREM', P .. ':jobs:' .. state, old)
  end
  redis.call('ZREM', P .. ':expiries', old)
end
return #ids
"""

# ARGV: prefix, '', group; KEYS: the task streams.  Trim entries every consumer has acknowledged: those
# older than both the oldest pending entry and the group's last delivered entry.  XTRIM (unlike XDEL) keeps
# the group's lag computable, which KEDA's lag trigger needs.
TRIM = _PREAMBLE + """
local trimmed = 0
for _, stream in ipairs(KEYS) do
  if redis.call('EXISTS', stream) == 1 then
    local groups = redis.call('XINFO', 'GROUPS', stream)
    for _, g in ipairs(groups) do
      local info = {}
      for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
      if info['name'] == ARGV[3] then
        local limit = info['last-delivered-id']
        local pending = redis.call('XPENDING', stream, ARGV[3])
        if pending[1] > 0 then limit = pending[2] end
        if limit ~= '0-0' then
          trimmed = trimmed + redis.call('XTRIM', stream, 'MINID', '~', limit)
        end
      end
    end
  end
end
return trimmed
"""
