"""The worker's synchronous HTTP path: ``server`` (routes, limits, deadline, readiness), ``buckets`` (per-client
rate limit) and ``fair`` (the one inference thread the stream and HTTP share, and how they take turns)."""
