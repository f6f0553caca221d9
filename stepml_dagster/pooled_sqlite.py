"""Dagster's SQLite storages with one SQLAlchemy engine per database file per process.

Dagster's SqliteRunStorage, SqliteEventLogStorage and SqliteScheduleStorage open a fresh engine and
sqlite3 connection for every operation and close it afterwards; closing the last connection of a WAL
database also checkpoints it. One experiment partition stores ≈ 130 events and opens ≈ 700
connections that way. The subclasses here keep each file's engine (and its pooled connections) for
the life of the process and are otherwise the same storages: the same files under the instance
folder (``history/runs.db``, ``history/runs/<run_id>.db`` + ``index.db``, ``schedules/schedules.db``),
the same schema creation and migrations (the base classes' ``from_local`` / ``_initdb``), the same
connect arguments, and the event log's ``_db_lock`` around each connection as before.

Processes: engines are kept per process. A forked child starts with none: ``os.register_at_fork``
moves the parent's engines into a keep-alive list in the child, never used and never closed there
(closing a parent's sqlite3 connection in the child would act on the parent's database handles).
Open files: at most ``MAX_ENGINES`` engines per process (the event log has one file per run); the
least recently used one beyond that is disposed (its idle connections closed). At exit (and at the end of a
multiprocessing child, a `stepml run` partition worker) a process closes its connections, so that the WAL files
go into their databases as with Dagster's storages; ``instance.dispose()`` closes the instance's files' engines.

``PooledSqliteInstance`` is the DagsterInstance whose default storage (no ``storage:`` block in
dagster.yaml) is ``PooledSqliteStorage`` on the instance folder, as Dagster's default is
``DagsterSqliteStorage`` there; deploy/dagster.yaml names it as ``instance_class``.
"""

from __future__ import annotations

import multiprocessing.util
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import sqlalchemy as sa
import yaml
from dagster import DagsterInstance
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.base_storage import DagsterStorage
from dagster._core.storage.event_log.sqlite.sqlite_event_log import INDEX_SHARD_NAME, SqliteEventLogStorage
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import SqliteScheduleStorage
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
from dagster._core.storage.sqlite_storage import (
    DagsterSqliteStorage,
    _event_logs_directory,
    _runs_directory,
    _schedule_directory,
)
from dagster._serdes import ConfigurableClassData

MAX_ENGINES = 16  # engines kept per process; each holds ≤ POOL_SIZE idle connections (3 open files each in WAL mode)
POOL_SIZE = 2  # idle connections kept per file; more threads at once get extra connections, closed on return


class _EngineCache:
    """This process's engines by connection string, least recently used first."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.engines: OrderedDict[str, sa.engine.Engine] = OrderedDict()
        self.exit_hook = False  # _dispose_own_engines registered to run at this process's exit


_cache = _EngineCache()
# engines a forked child inherited from its parent: referenced so that the child never closes them
_inherited_engines: list[sa.engine.Engine] = []


def _forget_inherited_engines() -> None:
    """In a forked child: start an empty cache (and a fresh lock, which the parent may have held at the fork);
    keep the parent's engines referenced, unused and open, so that no garbage collection closes them here."""
    global _cache
    if _cache.pid != os.getpid():
        _inherited_engines.extend(_cache.engines.values())
        _cache = _EngineCache()


def _dispose_own_engines() -> None:
    """At exit: close this process's connections, so that the last one to close checkpoints each WAL file into its
    database and removes the -wal/-shm files, as Dagster's per-operation connections do."""
    dispose_engines("")


os.register_at_fork(after_in_child=_forget_inherited_engines)


def engine_for(conn_string: str, connect_args: Mapping | None = None) -> sa.engine.Engine:
    """This process's engine for a SQLite file (created on first use; the first caller's connect_args apply)."""
    _forget_inherited_engines()  # a fork that ran no at-fork handlers
    cache = _cache
    evicted = None
    with cache.lock:
        engine = cache.engines.get(conn_string)
        if engine is None:
            engine = sa.create_engine(
                conn_string, connect_args=dict(connect_args or {}), pool_size=POOL_SIZE, max_overflow=-1
            )
            cache.engines[conn_string] = engine
            if not cache.exit_hook:  # multiprocessing's exit finalizers run at interpreter exit (atexit) and at the end
                # of a multiprocessing child, which skips atexit; registered here, after such a child cleared them
                multiprocessing.util.Finalize(None, _dispose_own_engines, exitpriority=0)
                cache.exit_hook = True
            if len(cache.engines) > MAX_ENGINES:
                evicted = cache.engines.popitem(last=False)[1]
        else:
            cache.engines.move_to_end(conn_string)
    if evicted is not None:
        evicted.dispose()  # idle connections close; one checked out now closes when its user returns it
    return engine


def dispose_engines(conn_string_prefix: str, *, keep: tuple[str, ...] = ()) -> int:
    """Dispose this process's engines whose connection string starts with the prefix (but those in keep); the
    next use opens a new one. Returns how many."""
    _forget_inherited_engines()
    cache = _cache
    with cache.lock:
        keys = [k for k in cache.engines if k.startswith(conn_string_prefix) and k not in keep]
        gone = [cache.engines.pop(k) for k in keys]
    for engine in gone:
        engine.dispose()
    return len(gone)


def cached_engine_count() -> int:
    """How many engines this process keeps now."""
    _forget_inherited_engines()
    return len(_cache.engines)


@contextmanager
def _transaction(engine: sa.engine.Engine) -> Iterator[sa.engine.Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn


class _OneFilePooled:
    """A SQLite storage of one file (``_conn_string``: runs.db, schedules.db) on this process's engine for it;
    listed before the Dagster class it pools."""

    @classmethod
    def from_config_value(cls, inst_data, config_value):  # the base's returns its own class
        return cls.from_local(inst_data=inst_data, **config_value)

    @contextmanager
    def connect(self) -> Iterator[sa.engine.Connection]:
        with _transaction(engine_for(self._conn_string)) as conn:
            yield conn

    def dispose(self) -> None:
        super().dispose()
        dispose_engines(self._conn_string)


class PooledSqliteRunStorage(_OneFilePooled, SqliteRunStorage):
    """SqliteRunStorage (history/runs.db) on this process's engine for the file."""


class PooledSqliteScheduleStorage(_OneFilePooled, SqliteScheduleStorage):
    """SqliteScheduleStorage (schedules/schedules.db) on this process's engine for the file."""


class PooledSqliteEventLogStorage(SqliteEventLogStorage):
    """SqliteEventLogStorage (history/runs/<run_id>.db and index.db) on this process's engine for each file."""

    @classmethod
    def from_config_value(cls, inst_data, config_value) -> PooledSqliteEventLogStorage:
        return cls(inst_data=inst_data, **config_value)

    def _engine(self, shard: str) -> sa.engine.Engine:
        return engine_for(self.conn_string_for_shard(shard), {"timeout": SQLITE_BUSY_TIMEOUT_SECONDS})

    @contextmanager
    def _connect(self, shard: str) -> Iterator[sa.engine.Connection]:
        with self._db_lock:
            engine = self._engine(shard)
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with _transaction(engine) as conn:
                yield conn

    def has_table(self, table_name: str) -> bool:
        engine = self._engine(INDEX_SHARD_NAME)
        with engine.connect() as conn:
            return bool(engine.dialect.has_table(conn, table_name))

    def _shard_prefix(self) -> str:
        return self.conn_string_for_shard("x")[: -len("x.db")]

    def wipe(self) -> None:
        """Dispose the run files' engines before the base class deletes the files (a kept connection would go on
        writing to the deleted file)."""
        with self._db_lock:
            dispose_engines(self._shard_prefix(), keep=(self.conn_string_for_shard(INDEX_SHARD_NAME),))
        super().wipe()

    def dispose(self) -> None:
        super().dispose()
        dispose_engines(self._shard_prefix())


class PooledSqliteStorage(DagsterSqliteStorage):
    """DagsterSqliteStorage (the storage of a dagster.yaml without ``storage:``) with the pooled storages above,
    in the same folders under base_dir."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        self.base_dir = base_dir
        self._run_storage = PooledSqliteRunStorage.from_local(_runs_directory(base_dir))
        self._event_log_storage = PooledSqliteEventLogStorage(_event_logs_directory(base_dir))
        self._schedule_storage = PooledSqliteScheduleStorage.from_local(_schedule_directory(base_dir))
        self._inst_data = inst_data
        DagsterStorage.__init__(self)  # not DagsterSqliteStorage.__init__, which opens the plain storages

    @classmethod
    def from_config_value(cls, inst_data, config_value) -> PooledSqliteStorage:  # base returns its own class
        return cls.from_local(inst_data=inst_data, **config_value)


class PooledSqliteInstance(DagsterInstance):
    """A DagsterInstance whose default storage is PooledSqliteStorage on the instance folder. A ``storage:`` block
    in dagster.yaml (PostgreSQL, say) replaces it as it replaces Dagster's default."""

    @classmethod
    def config_schema(cls) -> dict:
        return {}

    @staticmethod
    def config_defaults(base_dir: str) -> Mapping[str, ConfigurableClassData | None]:
        defaults = dict(InstanceRef.config_defaults(base_dir))
        defaults["storage"] = ConfigurableClassData(
            __name__, PooledSqliteStorage.__name__, yaml.dump({"base_dir": base_dir}, default_flow_style=False)
        )
        return defaults

    def dispose(self) -> None:
        """DagsterInstance.dispose disposes the run and event-log storages only; the schedule storage's kept engine
        goes too."""
        super().dispose()
        if self._schedule_storage is not None:
            self._schedule_storage.dispose()
