"""Model execution: the KV pool tensor, attention over it, sampling."""
