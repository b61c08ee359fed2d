"""Shards: preparation (sources -> WebDataset tars + manifest) and streaming to ranks.

Modules, bottom first: ``sources`` (image sources and their limits), ``manifest`` (the record of a
split's shards), ``plan`` (which rank reads which samples, across restarts and world sizes),
``prepare`` (writing shards), ``stream`` (a rank's batches).

May import: ``orchestrator.core``, ``orchestrator.config``. Importing the package loads none of
its modules.
"""

__all__ = ["manifest", "plan", "prepare", "sources", "stream"]
