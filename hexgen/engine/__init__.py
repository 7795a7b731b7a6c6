"""The torch engine: asymmetric TP + PP Llama stages. Torch-free submodules: messages, scheduler, checkpoint."""
