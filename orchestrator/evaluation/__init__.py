"""Scoring and looking at a model: per-image bits/dim over a split (``evaluate``), the lossless
codecs it is compared with (``baselines``), and sample grids (``images``).

May import: ``orchestrator.core``, ``orchestrator.config``, ``orchestrator.data``, ``flowpp``.
Importing the package loads none of its modules (they import torch).
"""

__all__ = ["baselines", "evaluate", "images"]
