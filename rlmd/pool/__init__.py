"""Load balancing over model providers: queueing, retries, health and accounting."""

from rlmd.pool.pool import AllCoolingError, CallCache, NoProviderError, Pool, ProviderStatus

__all__ = ["AllCoolingError", "CallCache", "NoProviderError", "Pool", "ProviderStatus"]
