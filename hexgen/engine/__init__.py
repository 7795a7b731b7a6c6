"""The torch engine: asymmetric TP + PP Llama stages. Torch-free submodules: messages, scheduler, block_manager,
kv_budget, checkpoint.

A rank's OpenMP threads share the machine's cores with the coordinator and other ranks. Threads that spin at
every barrier then stall one another each time the scheduler preempts one of them (measured on 2 cores: a
one-process server at 16 streams made 28 tok/s spinning, 137 sleeping); threads that sleep do not. Set here,
before torch loads, unless the user chose otherwise.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
