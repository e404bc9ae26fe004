"""affinity-gateway: an OpenAI-compatible LLM request router with shared prefix-cache affinity."""
