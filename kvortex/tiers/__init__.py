"""Storage tiers below the host-memory tier (L1): the local disk tier (L2) lives in
:mod:`kvortex.tiers.disk`, the shared tier (L3) on Redis or Valkey in :mod:`kvortex.tiers.redis`.
A tier module imports neither torch nor a serving engine."""
