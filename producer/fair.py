"""Fair share and priorities between the runs of one queue, kept in the broker's Redis.

A deepqueue producer does not put its messages on the queue's list: each run's messages wait in a
list of their own (``deepqueue:queued:{queue}:{run}``), and for each message one *token*
(``TOKEN``) goes on the queue's list. A worker takes entries off the queue's list as before
(``BLMOVE`` into its taking list, ``worker.delivery.transport``); when the entry is a token,
``TAKE`` swaps it, in the same script, for the message the scheduler picks:

- **priority classes first**: a message of a ``high`` run before any ``normal`` one, ``normal``
  before ``low``;
- **within a class, weighted fair share**: each run with messages waits in its class's zset by
  its *pass* (a deficit counter in virtual time); the run with the lowest pass is served and its
  pass grows by the jobs it got divided by its weight. Over any stretch, the jobs each run gets
  are proportional to its weight within one message (stride scheduling, which is what weighted
  deficit round robin computes, in one sorted set instead of a ring and a pointer). A run that
  gets work again joins at the class's virtual time (the pass last served): it gains no credit
  for the time it had none.

So the queue's list length is still the number of messages waiting (KEDA and the metrics read it),
a worker still blocks on one list, and the taking list still holds whatever a worker took until
kombu records it (a token or the message swapped for it). Anything else on the queue's list
(messages a worker put back, a plain Celery ``send_task`` producer's) is delivered as it comes:
FIFO, outside fair share.

Weights and classes are per run, in every queue it uses, and may change while it runs
(``set_share``: ``SHARES_KEY``). Each queue's fair hash (``deepqueue:fair:{queue}``) holds its
classes' virtual times, the counters of what waits in its runs' lists (``waiting``) and each
run's jobs waiting (``waiting_of``, which a submit's ``max_queued`` reads). A cancelled run's
list goes at once with as many tokens, any (``drop_run``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from producer.errors import ShareError
from producer.layout import FAIR_QUEUES_KEY, SHARES_KEY, class_key, fair_key, run_list_key

#: Priority classes, served strictly in this order.
PRIORITIES = ("high", "normal", "low")
DEFAULT_PRIORITY = "normal"
#: What stands on the queue's list for a message waiting in some run's list. Not JSON, so no
#: reader takes it for a message (a put-back of an unrecorded entry puts it back as it is).
TOKEN = b"deepqueue:next"
#: Where a message delivered from a run's list says the class it was taken in (for the worker's
#: buffer: a batch of a higher class goes first).
PRIORITY_HEADER = "x-deepqueue-priority"

# Shared by the scripts. KEYS[1] is SHARES_KEY. A run with messages in a queue is in exactly one of
# the queue's class zsets: its class's (c:{run}, normal when unset). Joining, it starts at the
# class's virtual time in that queue (vt:{class} of the queue's fair hash), or at the pass it had
# reached when its list last ran empty (p:{run}) if that is later: a run whose list empties and
# fills again (a submit with max_queued) keeps its place instead of jumping the line.
_LINES = """
local function share_of(run)
  local share = redis.call('HMGET', KEYS[1], 'c:' .. run, 'w:' .. run)
  return share[1] or 'normal', tonumber(share[2]) or 1
end
local function join(fair, line, class, run)
  if not redis.call('ZSCORE', line, run) then
    local at = redis.call('HMGET', fair, 'vt:' .. class, 'p:' .. run)
    redis.call('ZADD', line, math.max(tonumber(at[1]) or 0, tonumber(at[2]) or 0), run)
    redis.call('HDEL', fair, 'p:' .. run)
  end
end
local classes = {'high', 'normal', 'low'}
local rank = {high = 1, normal = 2, low = 3}
"""

# KEYS: shares, the queue's fair hash, its class zsets, the run's list, the queue's list, the
# set of fair queues. ARGV: run, the queue's name, jobs in all, the token, then the messages,
# first out first.
ENQUEUE = (
    _LINES
    + """
local run = ARGV[1]
local messages, tokens = {}, {}
for i = 5, #ARGV do
  messages[#messages + 1] = ARGV[i]
  tokens[#tokens + 1] = ARGV[4]
end
redis.call('LPUSH', KEYS[6], unpack(messages))
redis.call('LPUSH', KEYS[7], unpack(tokens))
redis.call('HINCRBY', KEYS[2], 'messages', #messages)
redis.call('HINCRBY', KEYS[2], 'jobs', ARGV[3])
redis.call('HINCRBY', KEYS[2], 'j:' .. run, ARGV[3])
redis.call('SADD', KEYS[8], ARGV[2])
local class = share_of(run)
join(KEYS[2], KEYS[2 + rank[class]], class, run)
return #messages
"""
)

# KEYS: shares, the queue's fair hash, its class zsets, then the taking list holding the token
# ('move'), or any key ('pop': kombu's BRPOP popped the token). ARGV: the token, the prefix of
# the runs' lists, 'move' or 'pop'. Returns {class index, message}, or false when no run has one
# (a token whose message went with a deleted run).
TAKE = (
    _LINES
    + """
local move = ARGV[3] == 'move'
if move and redis.call('LREM', KEYS[6], 1, ARGV[1]) == 0 then return false end
for index = 1, 3 do
  local line = KEYS[2 + index]
  while true do
    local head = redis.call('ZRANGE', line, 0, 0, 'WITHSCORES')
    if #head == 0 then break end
    local run, pass = head[1], tonumber(head[2])
    local list = ARGV[2] .. run
    local item
    if move then item = redis.call('LMOVE', list, KEYS[6], 'RIGHT', 'LEFT') else item = redis.call('RPOP', list) end
    if item then
      local extra = string.match(item, '"id": *"[^"]*%+(%d+)"')
      local jobs = extra and tonumber(extra) + 1 or 1
      local _, weight = share_of(run)
      redis.call('HSET', KEYS[2], 'vt:' .. classes[index], pass)
      if redis.call('LLEN', list) == 0 then
        redis.call('ZREM', line, run)
        redis.call('HSET', KEYS[2], 'p:' .. run, pass + jobs / weight)
      else
        redis.call('ZADD', line, pass + jobs / weight, run)
      end
      redis.call('HINCRBY', KEYS[2], 'messages', -1)
      redis.call('HINCRBY', KEYS[2], 'jobs', -jobs)
      if redis.call('HINCRBY', KEYS[2], 'j:' .. run, -jobs) <= 0 then redis.call('HDEL', KEYS[2], 'j:' .. run) end
      return {index - 1, item}
    end
    redis.call('ZREM', line, run)
  end
end
return false
"""
)

# KEYS: shares, the queue's fair hash, its class zsets, the run's list, the queue's list. ARGV:
# run, the token. Drops the run's waiting messages and as many tokens (any: they are alike).
DROP_RUN = """
local run = ARGV[1]
local messages = redis.call('LLEN', KEYS[6])
local jobs = tonumber(redis.call('HGET', KEYS[2], 'j:' .. run)) or 0
redis.call('DEL', KEYS[6])
for index = 3, 5 do redis.call('ZREM', KEYS[index], run) end
redis.call('HDEL', KEYS[2], 'j:' .. run, 'p:' .. run)
if messages > 0 then
  redis.call('HINCRBY', KEYS[2], 'messages', -messages)
  redis.call('HINCRBY', KEYS[2], 'jobs', 0 - jobs)  -- (-0, where jobs is 0, is no integer to Redis)
  redis.call('LREM', KEYS[7], messages, ARGV[2])
end
return messages
"""

# KEYS: shares, the set of fair queues. ARGV: run, class or '' (unchanged), weight or '', the
# prefix of the queues' fair hashes (a queue's class zsets are its hash's name, ':', the class).
# A run that changes class moves, in each queue where it has messages, to its new class's line
# (passes of two classes are not comparable: it starts at the new one's virtual time). The
# queues are read here, so that one a submit adds meanwhile is not missed.
SET_SHARE = (
    _LINES
    + """
local run, class, weight = ARGV[1], ARGV[2], ARGV[3]
if weight ~= '' then redis.call('HSET', KEYS[1], 'w:' .. run, weight) end
if class ~= '' then
  local current = share_of(run)
  redis.call('HSET', KEYS[1], 'c:' .. run, class)
  if current ~= class then
    for _, queue in ipairs(redis.call('SMEMBERS', KEYS[2])) do
      local fair = ARGV[4] .. queue
      redis.call('HDEL', fair, 'p:' .. run)
      if redis.call('ZREM', fair .. ':' .. current, run) == 1 then join(fair, fair .. ':' .. class, class, run) end
    end
  end
end
"""
)


def priority_rank(priority: str | None) -> int:
    """A class's place in ``PRIORITIES`` (lower goes first); normal's for None or any other."""
    return PRIORITIES.index(priority if priority in PRIORITIES else DEFAULT_PRIORITY)


def checked_share(priority: str | None, weight: float | None) -> tuple[str, str]:
    """``priority`` and ``weight`` as the scripts take them ('' for unchanged); raises ShareError."""
    if priority is not None and priority not in PRIORITIES:
        raise ShareError(f"priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    if weight is not None and not (0.001 <= weight <= 1000):
        raise ShareError(f"weight must be between 0.001 and 1000, got {weight!r}")
    return priority or "", "" if weight is None else repr(float(weight))


@dataclass(frozen=True)
class Share:
    """A run's place in the fair share of its queues."""

    priority: str = DEFAULT_PRIORITY
    weight: float = 1.0


def queue_keys(queue: str) -> list[str]:
    """A queue's fair hash and class zsets, in the scripts' order."""
    return [fair_key(queue), *(class_key(queue, priority) for priority in PRIORITIES)]


def set_share(client: redis.Redis, run_id: str, *, priority: str | None = None, weight: float | None = None) -> Share:
    """Set a run's class or weight (raises ShareError), live: in every queue, from the next
    message taken. Returns the run's share as it is now."""
    checked = checked_share(priority, weight)
    if any(checked):
        keys = [SHARES_KEY, FAIR_QUEUES_KEY]
        client.register_script(SET_SHARE)(keys=keys, args=[run_id, *checked, fair_key("")])
    return share(client, run_id)


def share(client: redis.Redis, run_id: str) -> Share:
    priority, weight = client.hmget(SHARES_KEY, [f"c:{run_id}", f"w:{run_id}"])
    return Share(priority.decode() if priority else DEFAULT_PRIORITY, float(weight) if weight else 1.0)


def forget_share(client: redis.Redis, run_id: str) -> None:
    """Drop a deleted run's class, weight and places."""
    client.hdel(SHARES_KEY, f"c:{run_id}", f"w:{run_id}")
    for queue in fair_queues(client):
        client.hdel(fair_key(queue.queue), f"p:{run_id}")


def fair_queues(client: redis.Redis) -> list[FairQueue]:
    """Every queue that has had runs' lists."""
    return [FairQueue(client, queue.decode()) for queue in sorted(client.smembers(FAIR_QUEUES_KEY))]


def drop_run(client: redis.Redis, run_id: str) -> int:
    """Drop a run's waiting messages from every queue (a cancelled run: its jobs' states say
    cancelled already, and the memory comes back at once); returns how many."""
    return sum(queue.drop(run_id) for queue in fair_queues(client))


def run_waiting(client: redis.Redis, run_id: str) -> int:
    """Jobs of a run waiting in the runs' lists of every queue."""
    return sum(queue.waiting_of(run_id) for queue in fair_queues(client))


class FairQueue:
    """One queue's runs' lists, on the broker's Redis client it is given."""

    def __init__(self, client: redis.Redis, queue: str) -> None:
        self._redis = client
        self.queue = queue
        self._keys = [SHARES_KEY, *queue_keys(queue)]
        self._enqueue = client.register_script(ENQUEUE)
        self._take = client.register_script(TAKE)
        self._drop = client.register_script(DROP_RUN)

    def enqueue(self, run_id: str, messages: Sequence[str], jobs: int, *, client: Any = None) -> None:
        """Queue a run's messages (first out first), a token each on the queue's list, in the
        run's class and weight (``set_share``). ``client``: a pipeline to add the call to."""
        keys = [*self._keys, run_list_key(self.queue, run_id), self.queue, FAIR_QUEUES_KEY]
        self._enqueue(keys=keys, args=[run_id, self.queue, jobs, TOKEN, *messages], client=client)

    def take(self, taking: str | None) -> tuple[str, bytes] | None:
        """For a token taken off the queue's list: the next message by class and share, as
        (its class, the entry), moved into the ``taking`` list in the token's stead (None: the
        token was popped, so is the message), or None if no run has one."""
        mode = "pop" if taking is None else "move"
        taken = self._take(keys=[*self._keys, taking or self.queue], args=[TOKEN, run_list_key(self.queue, ""), mode])
        if not taken:
            return None
        index, item = taken
        return PRIORITIES[int(index)], item

    def drop(self, run_id: str) -> int:
        """Drop a run's waiting messages and as many tokens; how many."""
        keys = [*self._keys, run_list_key(self.queue, run_id), self.queue]
        return int(self._drop(keys=keys, args=[run_id, TOKEN]))

    def waiting_of(self, run_id: str) -> int:
        """Jobs of one run waiting in its list."""
        return int(self._redis.hget(fair_key(self.queue), f"j:{run_id}") or 0)

    def waiting(self) -> tuple[int, int]:
        """(messages, jobs) waiting in the runs' lists (their tokens are on the queue's list)."""
        messages, jobs = self._redis.hmget(fair_key(self.queue), ["messages", "jobs"])
        return int(messages or 0), int(jobs or 0)

    def messages(self, run_id: str) -> list[bytes]:
        """A run's waiting messages, first out first."""
        return list(reversed(self._redis.lrange(run_list_key(self.queue, run_id), 0, -1)))
