"""Ray as hexgen's multi-machine control plane: joining nodes, connecting, probing, placement checks (no torch)."""
