"""Upstream selection for the waypoint: a service port's endpoints (`endpoints`), the load balancer that
picks one (`lb`), outlier detection that ejects failing ones (`outlier`) and retry decisions (`retry`).

Everything here is sans-IO: no sockets, no timers, no asyncio. Time and randomness are injected (a clock
callable, a `random.Random`), so the proxy owns the timers and tests are deterministic.
"""
