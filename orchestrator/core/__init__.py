"""What every other package stands on: errors, logging, the one redaction, progress output,
the one strict pydantic base, the one retry helper, the one lease, and storage (fsspec URLs, S3 retries).

May import: nothing of the project. Its modules are imported by name
(``from orchestrator.core import storage``); importing the package loads none of them.
"""

__all__ = ["errors", "lease", "logs", "progress", "redact", "retry", "storage", "strict"]
