"""Choosing the node for a request.

The router (the seam between the pure policy in `gateway.routing` and shared affinity),
shared affinity around the store, its breaker and deadlines, and where the store lives.
"""
