"""OpenAI-compatible HTTP coordinator over the replicas of a plan (no torch)."""
