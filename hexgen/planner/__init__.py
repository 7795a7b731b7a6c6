"""Choose replicas, their stages, TP degrees and layer splits for a GPU cluster (no torch)."""
