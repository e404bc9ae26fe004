"""Choosing the node for a request.

The router (the seam between the pure policy in `gateway.routing` and shared affinity), the
latency bands and the agreed tier it reads, shared affinity around the store (look-ups and
claims over local copies and single flight, every store call under its breaker and adaptive
deadline, renewals, the janitor), and where the store lives.
"""
