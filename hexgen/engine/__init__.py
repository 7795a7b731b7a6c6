"""The torch engine: asymmetric TP + PP Llama stages. Torch-free submodules: messages, scheduler, block_manager,
kv_budget, checkpoint.

A rank's OpenMP threads share the machine's cores with the coordinator and other ranks. Threads that spin at
every barrier then stall one another each time the scheduler preempts one of them (measured on 2 cores: a
one-process server at 16 streams made 28 tok/s spinning, 137 sleeping); threads that sleep do not. Set here,
before torch loads, unless the user chose otherwise.

Tensors of 2 MB and more are backed by transparent huge pages (torch's THP_MEM_ALLOC_ENABLE; the kernel's THP mode
is often `madvise`, which leaves them off otherwise): a decode step streams every weight, and with 4 KB pages
under a hypervisor's nested paging the TLB misses cost time. Measured on the 2-core EPYC VM, SmolLM2-135M fp32:
a batch-1 decode step 40.8 -> 37.6 ms, batch 16 74.4 -> 72.5 ms (two runs each way).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
