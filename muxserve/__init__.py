"""MuxServe: serve many LLMs on a few shared GPUs.

Importing the package is cheap and torch-free; the engine is imported on use.
"""

from __future__ import annotations

__version__ = "0.1.0"
