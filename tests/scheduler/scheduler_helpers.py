"""Small clusters and models shared by the scheduler tests."""

from __future__ import annotations

from hexgen.models import ModelSpec

TINY_CLUSTER = """
machines:
  - {name: big-0, gpu: A6000, count: 4, region: east}
  - {name: mid-0, gpu: A5000, count: 2, region: east}
  - {name: small-0, gpu: A4000, count: 2, region: west}
network:
  intra_machine: {bandwidth_gbps: 256, latency_ms: 0.01}
  intra_region:  {bandwidth_gbps: 10, latency_ms: 0.5}
  inter_region:  {bandwidth_gbps: 1, latency_ms: 30}
"""


def tiny_model(
    num_layers: int = 6, hidden: int = 4096, heads: int = 8, kv_heads: int = 4, vocab: int = 32000
) -> ModelSpec:
    """A Llama-shaped model with few layers, so brute force over layer splits stays small."""
    return ModelSpec(
        name="tiny", num_layers=num_layers, hidden_size=hidden, intermediate_size=4 * hidden,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads, vocab_size=vocab, max_context=4096,
    )
