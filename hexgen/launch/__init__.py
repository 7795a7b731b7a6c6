"""Starting and stopping the worker processes of replicas (local processes for now)."""
