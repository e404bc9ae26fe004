"""Dispatch to upstreams: trying providers in order until one answers.

The failover loop, the upstream client, attempt outcomes, provider permits, cooldowns and
load polling.
"""
