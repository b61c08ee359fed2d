"""What the training loop tells the outside world, as a small protocol.

``orchestrator.tracking.RunLogger`` (MLflow) is the implementation a job uses; ``MemoryTracker``
keeps every call in memory, for tests and for runs with tracking off that still want to look.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from orchestrator.config import MlflowSpec

__all__ = ["MemoryTracker", "Tracker"]


class Tracker(Protocol):
    enabled: bool

    def params(self, params: dict) -> None: ...

    def tags(self, tags: dict) -> None: ...

    def metrics(self, metrics: dict, step: int) -> None: ...

    def text(self, text: str, name: str) -> None: ...

    def image(self, path: str | Path, key: str, step: int) -> None: ...

    def system_metrics(self, spec: MlflowSpec) -> None: ...

    def registered_version(self) -> str | None: ...

    def register_model(self, model, name: str, tags: dict[str, Any]) -> str: ...

    def flush(self) -> int: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class MemoryTracker:
    """A ``Tracker`` that keeps what it is told: params and tags (first values kept, as MLflow
    keeps them), metric points by key, texts, image files read at once, registrations."""

    def __init__(self) -> None:
        self.enabled = True
        self.logged_params: dict[str, str] = {}
        self.logged_tags: dict[str, str] = {}
        self.points: dict[str, list[tuple[int, float]]] = {}
        self.texts: dict[str, str] = {}
        self.images: dict[str, dict[int, bytes]] = {}
        self.registered: list[tuple[str, dict[str, Any]]] = []
        self.status: str | None = None

    def params(self, params: dict) -> None:
        for k, v in params.items():
            self.logged_params.setdefault(k, str(v))

    def tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self.logged_tags.setdefault(k, str(v))

    def metrics(self, metrics: dict, step: int) -> None:
        for k, v in metrics.items():
            self.points.setdefault(k, []).append((step, float(v)))

    def text(self, text: str, name: str) -> None:
        self.texts[name] = text

    def image(self, path: str | Path, key: str, step: int) -> None:
        self.images.setdefault(key, {})[step] = Path(path).read_bytes()

    def system_metrics(self, spec: MlflowSpec) -> None:
        pass  # nothing samples the machine here

    def registered_version(self) -> str | None:
        return str(len(self.registered)) if self.registered else None

    def register_model(self, model, name: str, tags: dict[str, Any]) -> str:
        self.registered.append((name, dict(tags)))
        return str(len(self.registered))

    def flush(self) -> int:
        return 0

    def finish(self, status: str = "FINISHED") -> None:
        self.status = status
