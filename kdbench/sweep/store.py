"""The results store: one SQLite database per output folder.

Table ``trials`` has one row per trial key (the primary key, so never a duplicate),
with its config (its loss settings also as columns; ``params`` holds a method's own hyperparameters
as a JSON object), its dataset's display name (``dataset_name``, see
:func:`kdbench.data.specs.dataset_names`), status (``pending``, ``running``, ``done``, ``failed``), error,
attempts (times started), notes (e.g. ``worker process died (attempt 1 of 3); retrying``),
result JSON (best-on-validation and last-epoch metrics, history, timings,
environment), model complexity and flags, and the INT8 deployment of its best checkpoint (``int8``, a
:class:`~kdbench.records.Int8Result`, or why it is missing: ``int8_error``), a step derived from the finished
trial and recorded on its own, so it never changes a trial's key or status.  Each status change is one committed
transaction; WAL mode and a busy timeout let two sweeps share a store.  Tables
``sweeps`` and ``sweep_trials`` record each invocation and the trials it planned,
so a report covers exactly the latest plan.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from kdbench.data.specs import dataset_names
from kdbench.durable import file_lock
from kdbench.errors import UserError
from kdbench.records import Int8Result, Int8Settings, TrialResult, from_json, to_json
from kdbench.sweep.plan import PlannedTrial

STORE_FILE = "store.sqlite"
OLDER_COLUMNS = ("dataset_name", "notes", "params", "int8", "int8_error")  # trials columns a store of an older kdbench lacks

SCHEMA = """
CREATE TABLE IF NOT EXISTS trials (
    key TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    dataset TEXT NOT NULL,
    dataset_name TEXT,
    method TEXT NOT NULL,
    model TEXT NOT NULL,
    seed INTEGER NOT NULL,
    temperature REAL, alpha REAL, beta REAL, gamma REAL,
    params TEXT,
    teacher_key TEXT,
    config TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    error TEXT,
    result TEXT,
    complexity TEXT,
    best_test_accuracy REAL,
    last_test_accuracy REAL,
    flags TEXT NOT NULL DEFAULT '[]',
    attempts INTEGER NOT NULL DEFAULT 0,
    notes TEXT,
    completions INTEGER NOT NULL DEFAULT 0,
    int8 TEXT,
    int8_error TEXT,
    created_at REAL, started_at REAL, finished_at REAL
);
CREATE TABLE IF NOT EXISTS sweeps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    ablation_path TEXT,
    ablation TEXT NOT NULL,
    resolved TEXT,
    started_at REAL NOT NULL,
    finished_at REAL,
    summary TEXT,
    environment TEXT
);
CREATE TABLE IF NOT EXISTS sweep_trials (
    sweep_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    plan TEXT,
    PRIMARY KEY (sweep_id, key)
);
"""


class Store:
    """One results store.

    Args:
        path: the SQLite file; made, with its schema, unless ``read_only``.
        read_only: open through SQLite's read-only URI, for readers (the dry run, the report): the file is
            left byte for byte as it was (no switch to WAL, no schema upgrade, no lock file), so reading a
            committed store never dirties a checkout.
    """

    def __init__(self, path: str | Path, *, read_only: bool = False):
        self.path = Path(path)
        if read_only:
            self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=60, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        # switching to WAL takes an exclusive lock that SQLite's busy timeout does not wait for: two sweeps
        # opening a new store at once would fail with "database is locked", so opening is serialised
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            with self.transaction() as db:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                columns = {r["name"] for r in db.execute("PRAGMA table_info(trials)")}
                for column in OLDER_COLUMNS:
                    if column not in columns:
                        db.execute(f"ALTER TABLE trials ADD COLUMN {column} TEXT")
                for table, column in (("sweeps", "resolved"), ("sweep_trials", "plan")):
                    if column not in {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")

    @contextmanager
    def transaction(self):
        """``BEGIN IMMEDIATE`` ... ``COMMIT``: one writer at a time, all or nothing."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # --- sweeps -----------------------------------------------------------------------------------
    def begin_sweep(
        self, name: str, ablation_path: str, ablation: dict, resolved: str, trials: list[PlannedTrial], environment: dict
    ) -> int:
        """Record a sweep: its ablation file as given (``ablation``) and as planned (``resolved``, JSON of the
        :class:`~kdbench.sweep.ablation.Ablation`), and each planned trial with its :class:`~kdbench.records.TrialPlan`."""
        now = time.time()
        names = dataset_names(list(dict.fromkeys(t.config.data.dataset for t in trials)))  # grid order
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO sweeps (name, ablation_path, ablation, resolved, started_at, environment) VALUES (?, ?, ?, ?, ?, ?)",
                (name, ablation_path, json.dumps(ablation, sort_keys=True), resolved, now, json.dumps(environment)),
            )
            sweep_id = cur.lastrowid
            for t in trials:
                c, lo = t.config, t.config.loss
                own = dict(lo.params)  # the report's ablation columns: the settings of these names, where the method has them
                db.execute(
                    "INSERT OR IGNORE INTO trials (key, role, dataset, method, model, seed, temperature, alpha, beta, gamma,"
                    " params, teacher_key, config, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        t.key,
                        t.role,
                        c.data.dataset,
                        c.method,
                        c.recipe.model,
                        c.seed,
                        own.get("temperature"),
                        lo.alpha,
                        own.get("beta"),
                        own.get("gamma"),
                        json.dumps(own),
                        t.teacher_key,
                        json.dumps(c.identity(), sort_keys=True),
                        now,
                    ),
                )
                # the display name depends on the sweep's other datasets: the latest sweep's name wins
                db.execute("UPDATE trials SET dataset_name = ? WHERE key = ?", (names[c.data.dataset].display, t.key))
                db.execute(
                    "INSERT OR IGNORE INTO sweep_trials (sweep_id, key, plan) VALUES (?, ?, ?)",
                    (sweep_id, t.key, to_json(t.plan)),
                )
        return sweep_id

    def finish_sweep(self, sweep_id: int, summary: dict) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE sweeps SET finished_at = ?, summary = ? WHERE id = ?",
                (time.time(), json.dumps(summary), sweep_id),
            )

    # --- trials -----------------------------------------------------------------------------------
    def status(self, key: str) -> str | None:
        row = self.db.execute("SELECT status FROM trials WHERE key = ?", (key,)).fetchone()
        return row["status"] if row else None

    def mark_running(self, key: str) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE trials SET status = 'running', attempts = attempts + 1, started_at = ?, error = NULL"
                " WHERE key = ? AND status != 'done'",
                (time.time(), key),
            )

    def record_done(self, key: str, result: TrialResult, complexity: dict | None) -> bool:
        """Store a finished trial; returns False (and changes nothing) if it was already done."""
        with self.transaction() as db:
            cur = db.execute(
                "UPDATE trials SET status = 'done', error = NULL, result = ?, complexity = ?, best_test_accuracy = ?,"
                " last_test_accuracy = ?, completions = completions + 1, finished_at = ? WHERE key = ? AND status != 'done'",
                (
                    to_json(result),
                    json.dumps(complexity),
                    result.best.test.accuracy,
                    result.last.test.accuracy,
                    time.time(),
                    key,
                ),
            )
            return cur.rowcount == 1

    def record_int8(self, key: str, record: Int8Result | None, error: str | None = None) -> None:
        """Store a done trial's INT8 deployment, or (``record`` None) why it failed or was skipped."""
        with self.transaction() as db:
            db.execute(
                "UPDATE trials SET int8 = ?, int8_error = ? WHERE key = ? AND status = 'done'",
                (to_json(record) if record else None, error, key),
            )

    def needs_int8(self, keys: list[str], settings: Int8Settings) -> set[str]:
        """Those of ``keys`` that are done but have no INT8 result of ``settings`` (none, another's, or unreadable)."""
        wanted, needs = set(keys), set()
        for r in self.db.execute("SELECT key, int8 FROM trials WHERE status = 'done'").fetchall():
            if r["key"] not in wanted:
                continue
            try:
                stored = from_json(Int8Result, r["int8"], "an INT8 result").settings if r["int8"] else None
            except UserError:
                stored = None
            if stored != settings:
                needs.add(r["key"])
        return needs

    def add_note(self, key: str, note: str) -> None:
        """Append a line to the trial's ``notes`` (what happened on the way, e.g. a worker process that died)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE trials SET notes = CASE WHEN notes IS NULL THEN ? ELSE notes || char(10) || ? END WHERE key = ?",
                (note, note, key),
            )

    def record_failed(self, key: str, error: str) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE trials SET status = 'failed', error = ?, finished_at = ? WHERE key = ? AND status != 'done'",
                (error, time.time(), key),
            )

    def flag_weak_teachers(self) -> list[str]:
        """Recompute every trial's flags; returns the keys of teachers less accurate than one of their students.

        Flags (column ``flags``, a JSON list): ``teacher_weaker_than_students`` (a teacher whose best
        test accuracy is below one of its students'), ``student_at_chance`` (a done student whose
        best-on-validation accuracy is not significantly above chance: the result's ``chance``,
        kdbench.engine.metrics.chance_test), ``teacher_at_chance`` (the same for a teacher kept by
        ``run.allow_chance_teacher``), ``chance_untestable`` (a done trial whose validation
        split is too small for that test to have power; its accuracy may be chance).
        """
        rows = self.db.execute(
            "SELECT DISTINCT t.key FROM trials t JOIN trials s ON s.teacher_key = t.key"
            " WHERE t.status = 'done' AND s.status = 'done' AND s.best_test_accuracy > t.best_test_accuracy"
        ).fetchall()
        weak = [r["key"] for r in rows]
        flags: dict[str, list[str]] = {key: ["teacher_weaker_than_students"] for key in weak}
        for r in self.db.execute("SELECT key, role, result FROM trials WHERE status = 'done'").fetchall():
            chance = (json.loads(r["result"]) if r["result"] else {}).get("chance")
            if chance is None:
                continue
            if not chance["powered"]:
                flags.setdefault(r["key"], []).append("chance_untestable")
            elif chance["at_chance"]:
                flags.setdefault(r["key"], []).append(f"{r['role']}_at_chance")
        with self.transaction() as db:
            db.execute("UPDATE trials SET flags = '[]'")
            for key, names in flags.items():
                db.execute("UPDATE trials SET flags = ? WHERE key = ?", (json.dumps(names), key))
        return weak

    def rows(self, keys: list[str] | None = None) -> list[dict]:
        """Trial rows as dicts with JSON columns decoded (all trials, or those of ``keys``); ``result`` is a
        :class:`~kdbench.records.TrialResult`, ``int8`` an :class:`~kdbench.records.Int8Result` or None (a result another kdbench
        version wrote is a one-line UserError)."""
        rows = self.db.execute("SELECT * FROM trials").fetchall()
        if keys is not None:  # decode only the rows asked for: an older sweep's results may be of another format
            wanted = set(keys)
            rows = [r for r in rows if r["key"] in wanted]
        out = []
        for r in rows:
            d = dict(r)
            for col in OLDER_COLUMNS:  # a store of an older kdbench, opened read-only, is not upgraded
                d.setdefault(col, None)
            for col in ("config", "complexity", "flags"):
                d[col] = json.loads(d[col]) if d[col] else None
            what = f"the result of trial {d['key']} in {self.path}"
            d["result"] = from_json(TrialResult, d["result"], what) if d["result"] else None
            what = f"the INT8 result of trial {d['key']} in {self.path}"
            d["int8"] = from_json(Int8Result, d["int8"], what) if d["int8"] else None
            d["params"] = json.loads(d["params"]) if d["params"] else {}  # NULL in a store of an older kdbench
            out.append(d)
        return out

    def latest_sweep(self) -> dict | None:
        row = self.db.execute("SELECT * FROM sweeps ORDER BY id DESC LIMIT 1").fetchone()
        if row is None:
            return None
        d = dict(row)
        planned = self.db.execute("SELECT key, plan FROM sweep_trials WHERE sweep_id = ?", (d["id"],)).fetchall()
        d["keys"] = [r["key"] for r in planned]
        d["plans"] = {r["key"]: r["plan"] for r in planned}  # TrialPlan JSON; NULL in a store of an older kdbench
        for col in ("ablation", "summary", "environment"):
            d[col] = json.loads(d[col]) if d[col] else None
        return d
