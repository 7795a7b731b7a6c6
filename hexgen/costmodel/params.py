"""The knobs of the cost model (precision, achievable fraction of peak, reserve) and the workload shape."""

from __future__ import annotations

from dataclasses import dataclass

from hexgen.engine.scheduler import DEFAULT_BLOCK_SIZE
from hexgen.errors import UserError


@dataclass(frozen=True)
class CostConfig:
    """How hardware peaks translate to time; defaults are typical achievable fractions for fp16 inference."""

    dtype_bytes: int = 2
    compute_efficiency: float = 0.6  # fraction of peak tensor TFLOPS that large GEMMs reach
    memory_efficiency: float = 0.8  # fraction of peak memory bandwidth that weight/KV scans reach
    runtime_reserve_gb: float = 1.0  # GiB per GPU for the CUDA context, allocator slack and workspaces
    kv_block_tokens: int = DEFAULT_BLOCK_SIZE  # tokens per paged KV block, as the engine's scheduler allocates


@dataclass(frozen=True)
class Workload:
    """Request shape the plan is sized for: prompt and output tokens, and sequences a replica batches at once."""

    prompt_tokens: int = 128
    output_tokens: int = 64
    max_batch: int = 1

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 1 or self.max_batch < 1:
            raise UserError(
                f"prompt tokens ({self.prompt_tokens}), output tokens ({self.output_tokens}) and max batch "
                f"({self.max_batch}) must all be >= 1"
            )

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens
