"""Scheduling (torch-free): per-model queues, KV quotas, and the jobs handed to executors."""
