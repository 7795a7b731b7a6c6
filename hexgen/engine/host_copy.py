"""Host values into device tensors without making the host wait for the device.

On CUDA a copy from pageable host memory may first wait for the work already queued on the stream; in a decode
step that would hold the host's preparation of step N+1 until the GPU had finished step N, undoing the overlap
that Engine relies on. These helpers stage the values in pinned memory (PyTorch's caching host allocator keeps a
pinned buffer until its copy is done), so the copy is queued behind the step and the host goes on. Elsewhere the
values simply become a CPU tensor.
"""

from __future__ import annotations

import torch


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host list as a tensor on `device` (dtype as torch.tensor infers it unless given)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def tensor_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def copy_into(dest: torch.Tensor, values: list) -> None:
    """dest[...] = values (a host list of dest's shape), queued on the device without waiting for it."""
    dest.copy_(torch.tensor(values, dtype=dest.dtype, pin_memory=dest.is_cuda), non_blocking=True)
