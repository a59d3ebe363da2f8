"""The Redis job queue: streams of tasks, a consumer group of workers, results with a TTL (docs/queue.md).

connection  URLs, timeouts and backoff          store    the server's side: submit, read, cancel, list
keys        Redis key names                     tasks    the worker's side: read, reclaim, record outcomes
scripts     Lua scripts (atomic state changes)  worker   the worker loop over the engine
codec       job spec and task result formats    local    a redis-server child process
runtime     the queue inside `diffserve serve`
"""
