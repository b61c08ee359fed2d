"""Fresh MLflow sqlite stores for tests, at a copy's cost.

A new sqlite store runs MLflow's schema migrations where it is first opened (a second or two of CPU,
in whichever process opens it first: the test, a job's driver, a Ray worker). Dozens of tests each
want a store of their own. ``fresh_sqlite(path)`` copies one that MLflow made and migrated once in
this process, so every test still gets an empty, real store of its own, with the schema MLflow's
own migrations give it.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import sqlite3
import tempfile
from pathlib import Path

_template: Path | None = None


def _made_once() -> Path:
    global _template
    if _template is None:
        import mlflow

        folder = Path(tempfile.mkdtemp(prefix="mlflow-template-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        path = folder / "mlflow.db"
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # creates and migrates it
        _template = path
    return _template


def fresh_sqlite(path: Path) -> str:
    """An empty MLflow store in the sqlite file ``path`` (made here unless it exists); its URI.

    Its Default experiment keeps its artifacts beside it (``mlruns/0`` in ``path``'s folder, where a
    store made by a process working there would), not in the template's folder.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_made_once(), path)
        with contextlib.closing(sqlite3.connect(path)) as db, db:  # committed, then closed
            db.execute(
                "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                (str((path.parent / "mlruns" / "0").resolve()),),
            )
    return f"sqlite:///{path}"
