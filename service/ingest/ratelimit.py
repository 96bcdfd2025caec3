"""Token-bucket rate limiting in Redis, with an in-process fallback (degrade mode) when Redis is down.

While Redis is unreachable every request would otherwise pay a connect timeout, so after one failure the
limiter stops calling Redis and a background probe decides when to switch back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ingest.metrics import DEGRADED

log = logging.getLogger("ingest.ratelimit")

# KEYS[1] bucket; ARGV: rate per second, capacity, cost. Server time keeps every replica on one clock.
_TOKEN_BUCKET = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local allowed = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate) + 1)
local wait = 0
if allowed == 0 then wait = (cost - tokens) / rate end
return {allowed, tostring(wait)}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_seconds: float


class MemoryBuckets:
    """Token buckets in this process, bounded in how many clients they remember."""

    def __init__(self, per_minute: int, burst: int, max_keys: int = 10_000):
        self.rate = per_minute / 60.0
        self.capacity = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, cost: float = 1.0) -> Decision:
        now = time.monotonic()
        tokens, ts = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - ts) * self.rate)
        allowed = tokens >= cost
        if allowed:
            tokens -= cost
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return Decision(allowed, 0.0 if allowed else (cost - tokens) / self.rate)


class RateLimiter:
    def __init__(self, backend: str, redis_url: str, timeout: float, per_minute: int, burst: int,
                 probe_interval: float = 1.0, password: str | None = None):
        self.enabled = per_minute > 0
        self.backend = backend
        self.per_minute = per_minute
        self.burst = burst
        self.memory = MemoryBuckets(max(per_minute, 1), burst)
        self.probe_interval = probe_interval
        self._redis: aioredis.Redis | None = None
        if backend == "redis":
            self._redis = aioredis.Redis.from_url(
                redis_url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=0,
                retry_on_timeout=False, max_connections=64,
                # A password in the URL wins (redis-py merges the URL's options last); else REDIS_PASSWORD.
                **({"password": password} if password else {}),
            )
            self._script = self._redis.register_script(_TOKEN_BUCKET)
        self._degraded = False
        self._probe_task: asyncio.Task | None = None
        DEGRADED.set(0)

    @property
    def degraded(self) -> bool:
        return self._degraded

    async def start(self) -> None:
        if self._redis is not None and not await self.ping():
            self._enter_degraded("Redis unreachable at start-up")

    async def close(self) -> None:
        if self._probe_task:
            self._probe_task.cancel()
        if self._redis is not None:
            await self._redis.aclose()

    async def ping(self) -> bool:
        if self._redis is None:
            return True
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def check(self, key: str, cost: float = 1.0) -> Decision:
        if not self.enabled:
            return Decision(True, 0.0)
        if self._redis is None or self._degraded:
            return self.memory.take(key, cost)
        try:
            allowed, wait = await self._script(
                keys=[f"ingest:ratelimit:{key}"], args=[self.per_minute / 60.0, self.burst, cost]
            )
            return Decision(bool(int(allowed)), float(wait))
        except (RedisError, OSError) as exc:
            self._enter_degraded(f"Redis call failed: {type(exc).__name__}")
            return self.memory.take(key, cost)

    def _enter_degraded(self, reason: str) -> None:
        if self._degraded:
            return
        self._degraded = True
        DEGRADED.set(1)
        log.warning("entering degrade mode: in-process rate limiting", extra={"reason": reason})
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.get_running_loop().create_task(self._probe_until_back())

    async def _probe_until_back(self) -> None:
        while self._degraded:
            await asyncio.sleep(self.probe_interval)
            if await self.ping():
                self._degraded = False
                DEGRADED.set(0)
                log.warning("leaving degrade mode: Redis is back")


def retry_after_header(decision: Decision) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(decision.retry_after_seconds)))}
