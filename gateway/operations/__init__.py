"""Running the gateway.

Serving and supervising workers, reloads, the demo, metrics, logs, the status page and the
admin endpoints.
"""
