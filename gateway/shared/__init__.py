"""The pieces every layer shares, at the bottom of the house: OpenAI error shapes, metric
definitions, log set-up, the recent-decisions ring, secret redaction and the background loops'
retry and stop. Nothing here imports any other part of the gateway."""
