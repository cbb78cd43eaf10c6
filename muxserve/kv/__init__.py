"""KV pool accounting (torch-free): block ids, per-model quotas, block tables."""
