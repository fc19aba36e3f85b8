"""The Lua scripts behind ``producer.state.RunStore``: each state change of a run is one call,
so a job's record and the per-state sets never disagree, whoever writes (producer or worker).

They are kept apart from the Python side because they are the state machine itself (which
transitions are allowed, what a cancelled or deleted run turns them into) and are read and
reviewed as such; ``RunStore`` only packs their keys and arguments.
"""

# KEYS: jobs hash, one set per state in producer.state.STATES order, pending hash, meta hash,
# minutes hash. ARGV: the new state, then for each job its id, its record and the job as sent ('' for none; for
# 'queued', kept in pending until the job is final). A job moves unless it is final (done,
# cancelled), or running and asked to be queued again; cancel moves only queued jobs. In a
# cancelled run, a job asked to run (a first start, or again after its process died) or to be
# queued ends 'cancelled' instead; in a run resumed since, a cancelled job may be queued again. In
# a deleted run nothing is written. Returns how many moved to the state asked for.
# The state 'drop' is a worker's question about messages of a run it believes stopped: in a live
# run nothing is written and -1 is returned; in a cancelled run the jobs end as a start would end
# them (cancelled, unless final); in a deleted one nothing is written (0).
# The states 'claim' and 'claim+queued' are a producer's, before it sends: each job moves to
# 'queued' only if it is new or failed (or, with '+queued', queued already), and the script returns
# each claimed id with the record it had ('' for a new job), so producers racing one run each
# send only what they claimed: every job once. 'unclaim' (ARGV: id, record pairs, as a claim
# returned them) puts back jobs still queued after their publish failed.
TRANSITION = """
if redis.call('HEXISTS', KEYS[8], 'deleted_at') == 1 then return 0 end
local asked = ARGV[1]
local cancelled = redis.call('HEXISTS', KEYS[8], 'cancelled_at') == 1
local sets = {queued = KEYS[2], running = KEYS[3], done = KEYS[4], failed = KEYS[5], cancelled = KEYS[6]}
if asked == 'unclaim' then
  for i = 2, #ARGV, 2 do
    local id, before = ARGV[i], ARGV[i + 1]
    local current = redis.call('HGET', KEYS[1], id)
    if current and cjson.decode(current)['state'] == 'queued' then
      redis.call('SREM', KEYS[2], id)
      if before == '' then
        redis.call('HDEL', KEYS[1], id)
        redis.call('HDEL', KEYS[7], id)
      else
        redis.call('HSET', KEYS[1], id, before)
        redis.call('SADD', sets[cjson.decode(before)['state']], id)
      end
    end
  end
  return 0
end
local claim = asked == 'claim' or asked == 'claim+queued'
local claimed = {}
if claim then asked = 'queued' end
if asked == 'drop' then
  if not cancelled then return -1 end
  asked = 'running'
end
local new = asked
if (new == 'running' or new == 'queued') and cancelled then
  new = 'cancelled'
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
local moved = 0
for i = 2, #ARGV, 3 do
  local id = ARGV[i]
  local current = redis.call('HGET', KEYS[1], id)
  local old = current and cjson.decode(current)['state'] or false
  local final = old == 'done' or (old == 'cancelled' and new ~= 'queued')
  local allowed = not final and not (asked == 'queued' and old == 'running')
    and not (asked == 'cancelled' and old and old ~= 'queued')
    and not (claim and old and old ~= 'failed' and not (old == 'queued' and ARGV[1] == 'claim+queued'))
  if allowed then
    if claim and new == asked then
      claimed[#claimed + 1] = id
      claimed[#claimed + 1] = current or ''
    end
    local record = ARGV[i + 1]
    if new ~= asked then record = cjson.encode({state = new, at = now, reason = 'run cancelled'}) end
    redis.call('HSET', KEYS[1], id, record)
    if old and old ~= new then redis.call('SREM', sets[old], id) end
    redis.call('SADD', sets[new], id)
    if new == 'done' then redis.call('HDEL', KEYS[7], id) end
    if new == 'queued' and ARGV[i + 2] ~= '' then redis.call('HSET', KEYS[7], id, ARGV[i + 2]) end
    if new == 'running' then redis.call('HSETNX', KEYS[8], 'first_started_at', now) end
    if new == 'done' then
      redis.call('HSET', KEYS[8], 'last_done_at', now)
      redis.call('HINCRBY', KEYS[9], math.floor(now / 60), 1)
    end
    if new == asked then moved = moved + 1 end
  end
end
if claim then return claimed end
return moved
"""

# KEYS: recipes hash, jobs hash. ARGV: canonical recipe JSON, time, '1' to add it to a run that
# has other recipes. Returns the run's recipes as HGETALL does, after recording this one if the
# run had none; false for a run submitted before recipes were recorded (jobs but no recipes),
# which is left as it was. One call, so two first submits racing record one recipe, not two.
CLAIM_RECIPE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  if redis.call('EXISTS', KEYS[2]) == 1 then return false end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
elseif ARGV[3] == '1' then
  redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
end
return redis.call('HGETALL', KEYS[1])
"""
