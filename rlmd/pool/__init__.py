"""Load balancing over model providers: queueing, retries, health and accounting."""

from rlmd.pool.pool import CallCache, NoProviderError, Pool, ProviderStatus

__all__ = ["CallCache", "NoProviderError", "Pool", "ProviderStatus"]
