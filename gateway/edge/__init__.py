"""The HTTP edge: what clients send and what they get back.

The endpoint table, request parsing, OpenAI-shaped errors, connection guards, CORS,
public model names and stored-response routing.
"""
