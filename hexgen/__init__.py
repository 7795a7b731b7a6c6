"""hexgen: LLM serving over heterogeneous GPUs with asymmetric parallelism."""
