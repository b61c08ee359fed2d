"""The driver side of a job, on the machine that starts it: launching Ray Train (``launch``),
Tune searches (``search``), ``ray job submit`` (``submit``), the job's lock and state in storage
(``jobstate``), Ray's token (``rayauth``) and promotion in the registry (``promote``).

May import: every package below it (``core``, ``config``, ``data``, ``tracking``, ``evaluation``,
``training``), and ``flowpp``. Importing the package loads none of its modules.
"""

__all__ = ["jobstate", "launch", "promote", "rayauth", "search", "submit"]
