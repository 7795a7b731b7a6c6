"""Serving benchmark client: drives any OpenAI-compatible URL and reports latency, throughput and SLO attainment."""
