"""The Lua scripts behind ``producer.state.RunStore``: each state change of a run is one call,
so a job's slot, the run's counts and the job's details never disagree, whoever writes
(producer or worker).

They are kept apart from the Python side because they are the state machine itself (which
transitions are allowed, what a cancelled or deleted run turns them into) and are read and
reviewed as such; ``RunStore`` only packs their keys and arguments.
"""

from producer.slots import BLOCK_SLOTS, SLOT_BYTES

# KEYS: ``producer.state.STATE_KEYS`` in that order: counts, others, reasons, running, meta,
# minutes, blocks, keys, images. ARGV: the new state; the prefix of the run's slot blocks
# (``deepqueue:{run}:slots:``); then for each job its id, its index and tag (``producer.slots.place``;
# '' and '' for an id of another form) and a detail (failed: the reason; running: the worker; done:
# the image's key; else ''). A claim's ARGV differ after the prefix (below).
#
# Where a job's state lives (``producer.slots``): the 8-byte slot at its index, in block string
# prefix .. index // BLOCK_SLOTS, when the slot is free or holds the job's tag; else (another
# recipe's job took the slot first, or an id of another form) the others hash, id -> state code and
# extension code. A slot keeps its tag once taken, so an id that went to others stays there. The
# block keys are not in KEYS: they are built here from the prefix, and share the run's hash tag.
# Slots written one after another in a block go to Redis as one SETRANGE.
#
# A job moves unless it is final (done, cancelled), or running and asked to be queued again;
# cancel moves only queued jobs. In a cancelled run, a job asked to run (a first start, or again
# after its process died) or to be queued ends 'cancelled' instead; in a run resumed since, a
# cancelled job may be queued again. In a deleted run nothing is written. Returns how many moved
# to the state asked for.
# The state 'drop' is a worker's question about messages of a run it believes stopped: in a live
# run nothing is written and -1 is returned; in a cancelled run the jobs end as a start would end
# them (cancelled, unless final); in a deleted one nothing is written (0).
# The states 'claim' and 'claim+queued' are a producer's, before it sends: each job moves to
# 'queued' only if it is new or failed (or, with '+queued', queued already), and the script returns
# a string of one character per job, '1' for each it claimed, then each claimed id that was not
# new with what it was (its state code, and a failed job's reason after it): producers racing one
# run each send only what they claimed, every job once. (One string for the many new jobs: a
# reply of an element per job cost the producer more to read than Redis to write.)
# A claim passes most of its jobs as runs, so that a submit's many new jobs cost neither an
# argument nor any work each: ARGV after the prefix is the number of runs; for each run the index
# of its first job and its jobs' tags, 6 bytes each one after another (jobs at consecutive indexes
# of one block; no index in two runs of a call); then, 4 arguments each as above (detail ''), the
# jobs in no run: ids of another form, and any whose index a run of the call has. A run whose
# slots were never used (all zero bytes, or past the block's end) is claimed whole in one
# SETRANGE; any other goes job by job, its ids rebuilt from index and tag. The flags follow that
# order: the runs' jobs, then the others.
# 'unclaim' (ARGV after the prefix: id, index, tag and what it was, as a claim returned it) puts
# back jobs still queued after their publish failed.
_TRANSITION = """
local COUNTS, OTHERS, REASONS, RUNNING, META, MINUTES, BLOCKS, WHOLE, IMAGES = unpack(KEYS)
if redis.call('HEXISTS', META, 'deleted_at') == 1 then return 0 end
local asked, prefix = ARGV[1], ARGV[2]
local claim = asked == 'claim' or asked == 'claim+queued'
local runs = claim and tonumber(ARGV[3]) or 0
local first_job = claim and 4 + 2 * runs or 3  -- where the jobs passed one by one start
local SLOT, BLOCK, TAG = SLOT_BYTES, BLOCK_SLOTS, SLOT_BYTES - 2
local ID = '%08d-' .. string.rep('%02x', TAG)  -- an id from its index and tag (producer.job.job_id)
local EMPTY = string.rep('\\0', SLOT)
local code = {queued = 'q', running = 'r', done = 'd', failed = 'f', cancelled = 'c'}
local name = {q = 'queued', r = 'running', d = 'done', f = 'failed', c = 'cancelled'}
local extension = {png = 'p', webp = 'w', jpg = 'j'}
local listed = {}
-- Slots are read a block at a time (one GET) when a call has many jobs, alone when it has few.
local read, written = {}, {}  -- block -> its string as this call found it; index -> slot written since
local few = not claim and #ARGV < 20  -- a claim reads its blocks whole anyway (its runs)
local counts = {q = 0, r = 0, d = 0, f = 0, c = 0}  -- changes, written once at the end
-- Slots to write wait here while each follows the one before in its block, to go as one SETRANGE.
local pending = {slots = {}, size = 0}

local function write_pending()
  if pending.size > 0 then redis.call('SETRANGE', pending.key, pending.offset, table.concat(pending.slots)) end
  pending = {slots = {}, size = 0}
end

local function write_changes()
  write_pending()
  for state, change in pairs(counts) do
    if change ~= 0 then redis.call('HINCRBY', COUNTS, name[state], change) end
  end
end

-- Where the slot at ``index`` is.
local function locate(index)
  local block = math.floor(index / BLOCK)
  return {block = block, key = prefix .. block, offset = (index % BLOCK) * SLOT, index = index}
end

local function block_string(at)
  if not read[at.block] then read[at.block] = redis.call('GET', at.key) or '' end
  return read[at.block]
end

-- Write slots (one, or a run's) at ``at``, listing its block the first time.
local function write_slots(at, slots)
  if not listed[at.block] then
    if redis.call('SADD', BLOCKS, at.block) == 1 then  -- a new block: allocated whole, once
      redis.call('SETRANGE', at.key, SLOT * BLOCK - 1, '\\0')
    end
    listed[at.block] = true
  end
  if pending.size > 0 and (at.key ~= pending.key or at.offset ~= pending.offset + pending.size) then
    write_pending()
  end
  if pending.size == 0 then pending.key, pending.offset = at.key, at.offset end
  pending.slots[#pending.slots + 1] = slots
  pending.size = pending.size + #slots
end

-- Where the job's state lives, and that state's code (false: none).
local function find(id, index, tag)
  if index ~= '' then
    local at = locate(tonumber(index))
    at.tag = tag
    local slot = written[at.index]
    if not slot and few then
      slot = redis.call('GETRANGE', at.key, at.offset, at.offset + SLOT - 1)
    elseif not slot then
      slot = string.sub(block_string(at), at.offset + 1, at.offset + SLOT)
    end
    if #slot < SLOT then slot = EMPTY end
    if string.sub(slot, 3) == at.tag or slot == EMPTY then
      at.state = string.byte(slot, 1) ~= 0 and string.sub(slot, 1, 1)
      return at
    end
  end
  local other = redis.call('HGET', OTHERS, id)
  return {state = other and string.sub(other, 1, 1) or false}
end

-- Set the job's state code (false: no job) and extension code; keep counts and details right.
local function put(at, id, state, ext)
  if at.key then
    local slot = (state or '\\0') .. (state and ext or '-') .. at.tag
    write_slots(at, slot)
    written[at.index] = slot
  elseif state then
    redis.call('HSET', OTHERS, id, state .. (ext or '-'))
  else
    redis.call('HDEL', OTHERS, id)
  end
  if at.state ~= state then
    if at.state then counts[at.state] = counts[at.state] - 1 end
    if state then counts[state] = counts[state] + 1 end
    if at.state == 'f' then redis.call('HDEL', REASONS, id) end
    if at.state == 'r' then redis.call('HDEL', RUNNING, id) end
  end
  at.state = state
end

-- A done job's extension code; '?' where its key is not {images}/{id}.{ext} (kept whole).
local function done_extension(id, key)
  if key == '' then return '-' end
  local folder, file = string.match(key, '^(.*)/([^/]+)$')
  local ext = file and string.sub(file, 1, #id + 1) == id .. '.' and extension[string.sub(file, #id + 2)]
  if ext then
    redis.call('SET', IMAGES, folder, 'NX')
    if redis.call('GET', IMAGES) == folder then return ext end
  end
  redis.call('HSET', WHOLE, id, key)
  return '?'
end

if asked == 'unclaim' then
  for i = first_job, #ARGV, 4 do
    local id, before = ARGV[i], ARGV[i + 3]
    local at = find(id, ARGV[i + 1], ARGV[i + 2])
    if at.state == 'q' then
      if before == '' then
        put(at, id, false)
      else
        put(at, id, string.sub(before, 1, 1))
        if at.state == 'f' then redis.call('HSET', REASONS, id, string.sub(before, 2)) end
      end
    end
  end
  write_changes()
  return 0
end
local flags, claimed = {}, {}
if claim then asked = 'queued' end
local cancelled = redis.call('HEXISTS', META, 'cancelled_at') == 1
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
local done = 0

-- Move one job as asked (a claim: and say what it took).
local function move(id, index, tag, detail)
  local at = find(id, index, tag)
  local old = at.state and name[at.state]
  local final = old == 'done' or (old == 'cancelled' and new ~= 'queued')
  local allowed = not final and not (asked == 'queued' and old == 'running')
    and not (asked == 'cancelled' and old and old ~= 'queued')
    and not (claim and old and old ~= 'failed' and not (old == 'queued' and ARGV[1] == 'claim+queued'))
  local taken = allowed and claim and new == asked
  if claim then flags[#flags + 1] = taken and '1' or '0' end
  if taken and at.state then
    claimed[#claimed + 1] = id
    claimed[#claimed + 1] = at.state .. (old == 'failed' and (redis.call('HGET', REASONS, id) or '') or '')
  end
  if allowed then
    put(at, id, code[new], new == 'done' and done_extension(id, detail) or '-')
    if new == 'failed' then redis.call('HSET', REASONS, id, detail) end
    if new == 'running' and detail ~= '' then redis.call('HSET', RUNNING, id, detail) end
    if new == 'done' then done = done + 1 end
    if new == asked then moved = moved + 1 end
  end
end

for i = 4, first_job - 1, 2 do
  local first, tags = tonumber(ARGV[i]), ARGV[i + 1]
  local size = #tags / TAG
  local at = locate(first)
  if not string.find(string.sub(block_string(at), at.offset + 1, at.offset + size * SLOT), '[^%z]') then
    -- Slots never used (all zero bytes, or past the block's end): every job is new and moves.
    write_slots(at, (string.gsub(tags, string.rep('.', TAG), code[new] .. '-%0')))
    flags[#flags + 1] = string.rep(new == asked and '1' or '0', size)
    counts[code[new]] = counts[code[new]] + size
    if new == asked then moved = moved + size end
  else
    for k = 0, size - 1 do
      local tag = string.sub(tags, k * TAG + 1, (k + 1) * TAG)
      move(string.format(ID, first + k, string.byte(tag, 1, TAG)), first + k, tag, '')
    end
  end
end
if runs > 0 then  -- the jobs below may have a run's index: they read its slots as written
  write_pending()
  read = {}
end
for i = first_job, #ARGV, 4 do
  move(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
end
-- What is the same for every job of the call, written once.
if done > 0 then
  redis.call('HSET', META, 'last_done_at', now)
  redis.call('HINCRBY', MINUTES, math.floor(now / 60), done)
end
if counts.r > 0 and new == 'running' then redis.call('HSETNX', META, 'first_started_at', now) end
if new == 'failed' and moved > 0 then redis.call('HSET', META, 'last_failed_at', now) end
write_changes()
if claim then return {table.concat(flags), unpack(claimed)} end
return moved
"""

TRANSITION = _TRANSITION.replace("SLOT_BYTES", str(SLOT_BYTES)).replace("BLOCK_SLOTS", str(BLOCK_SLOTS))

# KEYS: as TRANSITION's. ARGV: the slot blocks' prefix, a block number. Cancels every queued job
# whose slot is in that block, in one pass over the block string (a job in others is cancelled
# through TRANSITION); returns how many. Nothing in a deleted run.
CANCEL_BLOCK = """
local COUNTS, META = KEYS[1], KEYS[5]
if redis.call('HEXISTS', META, 'deleted_at') == 1 then return 0 end
local key = ARGV[1] .. ARGV[2]
local data = redis.call('GET', key)
if not data then return 0 end
local cancelled = 0
local changed = string.gsub(data, '(.)(.......)', function(state, rest)
  if state == 'q' then
    cancelled = cancelled + 1
    return 'c' .. rest
  end
end)
if cancelled > 0 then
  redis.call('SET', key, changed)
  redis.call('HINCRBY', COUNTS, 'queued', -cancelled)
  redis.call('HINCRBY', COUNTS, 'cancelled', cancelled)
end
return cancelled
"""

# KEYS: recipes hash, counts hash. ARGV: canonical recipe JSON, time, '1' to add it to a run that
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

# Completion webhooks (``producer.notify_state``). KEYS of each: the run's notify hash, its claim
# string, then (NOTIFY_CLAIM only) its counts and meta hashes; all share the run's hash tag. Times
# are Redis' clock.

# ARGV: the URL ('' to keep the one stored: a submit without --notify only holds), seconds to hold.
# Stores the URL and holds the notification while a submit sends (its end would be premature);
# a new URL starts the run's notification afresh unless a delivery is in flight. Returns 1 if the
# run has a URL (and is now held), else 0.
NOTIFY_HOLD = """
local NOTIFY, CLAIM = KEYS[1], KEYS[2]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
if ARGV[1] ~= '' then
  if redis.call('EXISTS', CLAIM) == 0 then
    redis.call('HDEL', NOTIFY, 'delivered_at', 'failed_at', 'tries', 'last', 'event', 'claimed_at')
  end
  redis.call('HSET', NOTIFY, 'url', ARGV[1])
elseif redis.call('HEXISTS', NOTIFY, 'url') == 0 then
  return 0
end
redis.call('HSET', NOTIFY, 'held_until', now + tonumber(ARGV[2]))
return 1
"""

# ARGV: mode ('end': the run must have ended; 'cancel': it was just cancelled), token, lease in ms.
# Claims the run's one delivery for the caller if it is due: a URL, not delivered nor given up,
# no live claim, and (mode 'end') not held by a submit and every job final. Returns
# {'mine', url, event} to the one caller that claimed it, else {why, detail}: 'none' (no URL),
# 'settled' (delivered, given up, or the run deleted), 'claimed' (ms left on another's claim),
# 'held' (until when), 'running'.
NOTIFY_CLAIM = """
local NOTIFY, CLAIM, COUNTS, META = unpack(KEYS)
local mode, token, lease = ARGV[1], ARGV[2], ARGV[3]
local url = redis.call('HGET', NOTIFY, 'url')
if not url then return {'none', ''} end
if redis.call('HEXISTS', NOTIFY, 'delivered_at') == 1 or redis.call('HEXISTS', NOTIFY, 'failed_at') == 1
  or redis.call('HEXISTS', META, 'deleted_at') == 1 then
  return {'settled', ''}
end
local left = redis.call('PTTL', CLAIM)
if left ~= -2 then return {'claimed', tostring(left)} end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1e6
local event = 'cancelled'
if mode ~= 'cancel' then
  local held = tonumber(redis.call('HGET', NOTIFY, 'held_until') or '0')
  if held > now then return {'held', tostring(held)} end
  local c = redis.call('HMGET', COUNTS, 'queued', 'running', 'done', 'failed', 'cancelled')
  local busy = tonumber(c[1] or '0') + tonumber(c[2] or '0')
  local final = tonumber(c[3] or '0') + tonumber(c[4] or '0') + tonumber(c[5] or '0')
  if busy > 0 or final == 0 then return {'running', ''} end
  if redis.call('HEXISTS', META, 'cancelled_at') == 0 then event = 'finished' end
end
redis.call('SET', CLAIM, token, 'PX', lease)
redis.call('HSET', NOTIFY, 'event', event, 'claimed_at', now)
return {'mine', url, event}
"""

# ARGV: token, lease in ms. Before each try: renews the claim and counts the try, if the claim is
# still the caller's (1), else 0 (its lease ran out and another may hold it: stop).
NOTIFY_TRY = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[1], 'tries', 1)
return 1
"""

# ARGV: token, outcome ('delivered', 'failed', or '' to give the claim back untouched), the last
# answer (an HTTP status or an error, short). Ends the caller's claim; 0 if it was not its own.
NOTIFY_SETTLE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if ARGV[2] ~= '' then
  local clock = redis.call('TIME')
  redis.call('HSET', KEYS[1], ARGV[2] .. '_at', tonumber(clock[1]) + tonumber(clock[2]) / 1e6, 'last', ARGV[3])
end
redis.call('DEL', KEYS[2])
return 1
"""
