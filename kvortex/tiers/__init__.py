"""Storage tiers below the host-memory tier (L1): the local disk tier (L2) lives in
:mod:`kvortex.tiers.disk`. A tier module imports neither torch nor a serving engine."""
