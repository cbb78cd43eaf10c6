"""Where jobs run: inline (one process, a stream per model and phase) or worker processes."""
