"""Building blocks for rebuilding a node from a consistent snapshot of a healthy one.

`SnapshotSet.open` connects to every database of the source; the router then holds its
commit barrier just long enough for `SnapshotSet.export` to begin one REPEATABLE READ
transaction per database and export its snapshot; then, with
commits flowing again, `dump_globals`, `reset_node`, `restore_globals` and `copy_database`
(pg_dump --snapshot, pg_restore --create) rebuild the target as of that snapshot.

SQL goes through the router's own client (`Link`); the dump and restore through the
PostgreSQL client tools, with the password in PGPASSWORD, never on a command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pgquorum.cluster.model import Node
from pgquorum.local.binaries import PgBinaries, find_binaries
from pgquorum.local.instance import conninfo_quote
from pgquorum.router.client import Link, open_links
from pgquorum.sql.quoting import quote_ident, quote_literal

APPLICATION_NAME = "pgquorum recovery"
PROGRESS_INTERVAL_S = 0.2
CONNECT_TIMEOUT_S = 30
_STDERR_TAIL = 2000

_DATABASES = (
    "SELECT datname FROM pg_catalog.pg_database "
    "WHERE datallowconn AND NOT datistemplate ORDER BY datname"
)
# The exporting transactions sit idle while pg_dump runs, maybe for hours: no timeout of the
# server's configuration may end them (transaction_timeout exists from PostgreSQL 17 on, hence
# the lookup in pg_settings rather than a SET).
_EXPORT = (
    "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; "
    "SELECT pg_catalog.set_config(name, '0', true) FROM pg_catalog.pg_settings "
    "WHERE name IN ('idle_in_transaction_session_timeout', 'transaction_timeout'); "
    "SELECT pg_catalog.pg_export_snapshot()"
)


class RestoreError(Exception):
    """A client tool (pg_dump, pg_restore, pg_dumpall, psql) failed."""


@dataclass(frozen=True)
class Credentials:
    """A superuser on every node."""

    user: str
    password: str | None


class SnapshotSet:
    """One open REPEATABLE READ transaction per database of the source node, each with an
    exported snapshot, kept open until close() (pg_dump can only import a snapshot while the
    transaction that exported it is still open).

    ``open`` connects to every database before the commit barrier; ``export``, under it,
    only runs the exporting queries (and connects to a database created meanwhile)."""

    def __init__(self, source: Node, creds: Credentials, links: dict[str, Link]) -> None:
        self.source = source
        self.creds = creds
        self._links = links
        self.databases: dict[str, str] = {}  # database name -> snapshot id, once exported

    @classmethod
    async def open(cls, source: Node, creds: Credentials) -> SnapshotSet:
        """SQL errors are raised as PgError, an unreachable source as NodeLost."""
        snaps = cls(source, creds, {})
        try:
            await snaps._connect(await list_databases(source, creds))
        except BaseException:
            snaps.close()
            raise
        return snaps

    async def export(self) -> None:
        """Under the commit barrier: a snapshot of every database there is now."""
        links = self._links
        if links:  # asked on a connection already open: no new one in the pause
            names = [str(r[0]) for r in (await next(iter(links.values())).query(_DATABASES))[1]]
        else:
            names = await list_databases(self.source, self.creds)
        for gone in set(links) - set(names):
            links.pop(gone).close()
        await self._connect([db for db in names if db not in links])
        ids = await asyncio.gather(*(links[db].query(_EXPORT) for db in names))
        self.databases = {db: str(r[1][0][0]) for db, r in zip(names, ids, strict=True)}

    async def _connect(self, names: list[str]) -> None:
        await open_links({db: _open(self.source, self.creds, db) for db in names}, self._links)

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links = {}


async def list_databases(node: Node, creds: Credentials) -> list[str]:
    """The databases to copy: those that accept connections, templates excluded."""
    link = await _open(node, creds, "template1")
    try:
        return [str(r[0]) for r in (await link.query(_DATABASES))[1]]
    finally:
        link.close()


async def dump_globals(source: Node, creds: Credentials, binaries: PgBinaries | None = None) -> str:
    """The roles of `source` as SQL (pg_dumpall --globals-only), each dropped first if it
    exists so that the restore replaces it. Tablespaces are not supported."""
    bins = await _binaries(binaries)
    args = [
        *_tool(bins, "pg_dumpall", source, creds, "template1"),
        "--globals-only",
        "--no-tablespaces",
        "--clean",
        "--if-exists",
    ]
    rc, out, err = await _run(args, creds)
    if rc != 0:
        raise RestoreError(f"pg_dumpall of {source.name} failed (exit {rc}): {_tail(err)}")
    return out.decode()


async def reset_node(target: Node, creds: Credentials) -> None:
    """Empty `target`: roll back its prepared transactions, then drop every database but
    template0 and template1 (their roles stay; `restore_globals` replaces them)."""
    link = await _open(target, creds, "template1")
    try:
        # A prepared transaction holds its database open (DROP DATABASE refuses, even with
        # FORCE) and can only be rolled back from a session in that database.
        prepared = (await link.query("SELECT database, gid FROM pg_catalog.pg_prepared_xacts"))[1]
        by_db: dict[str, list[str]] = {}
        for db, gid in prepared:
            by_db.setdefault(str(db), []).append(str(gid))
        for db, gids in by_db.items():
            db_link = await _open(target, creds, db)
            try:
                for gid in gids:
                    await db_link.query(f"ROLLBACK PREPARED {quote_literal(gid)}")
            finally:
                db_link.close()
        rows = (
            await link.query(
                "SELECT datname, datistemplate FROM pg_catalog.pg_database "
                "WHERE datname NOT IN ('template0', 'template1')"
            )
        )[1]
        for db, is_template in rows:
            if is_template == "t":  # a template database cannot be dropped
                await link.query(f"ALTER DATABASE {quote_ident(str(db))} WITH IS_TEMPLATE false")
            # FORCE ends the sessions still connected to it.
            await link.query(f"DROP DATABASE {quote_ident(str(db))} WITH (FORCE)")
    finally:
        link.close()


async def restore_globals(
    target: Node, creds: Credentials, sql: str, binaries: PgBinaries | None = None
) -> None:
    """Run the SQL of `dump_globals` with psql on `target`'s template1.

    The connecting role cannot drop itself, nor the bootstrap superuser, so their DROP ROLE
    and the CREATE ROLE that follows fail as expected (their ALTER ROLE still applies the
    source's attributes); any other error raises RestoreError.
    """
    bins = await _binaries(binaries)
    args = [
        *_tool(bins, "psql", target, creds, "template1"),
        "--no-psqlrc",
        "--quiet",
        "--file=-",  # errors then name their line: "psql:<stdin>:12: ERROR:  ..."
        "--set",
        "ON_ERROR_STOP=0",  # go past the expected errors; the others are sorted out below
    ]
    # Untranslated server messages, so that the expected errors can be recognised.
    rc, _out, err = await _run(args, creds, stdin=sql.encode(), pgoptions="-c lc_messages=C")
    text = err.decode(errors="replace")
    if rc != 0:
        raise RestoreError(f"psql on {target.name} failed (exit {rc}): {_tail(err)}")
    errors = [m.group(1) for line in text.splitlines() if (m := _ERROR.match(line))]
    kept = {creds.user}  # roles that survive their DROP ROLE
    kept.update(m.group(1) for e in errors if (m := _UNDROPPABLE.fullmatch(e)))
    unexpected = [e for e in errors if not _expected(e, kept)]
    if unexpected:
        raise RestoreError(f"psql on {target.name} (globals): " + "; ".join(unexpected))


_ERROR = re.compile(r"(?:psql:.*?:\d+: )?ERROR:\s+(.*)")
_UNDROPPABLE = re.compile(r"cannot drop role (.+) because it is required by the database system")
_EXISTS = re.compile(r'role "(.+)" already exists')


def _expected(error: str, kept: set[str]) -> bool:
    if error == "current user cannot be dropped" or _UNDROPPABLE.fullmatch(error):
        return True
    exists = _EXISTS.fullmatch(error)
    return exists is not None and exists.group(1) in kept


async def copy_database(
    source: Node,
    target: Node,
    creds: Credentials,
    database: str,
    snapshot: str,
    workdir: Path,
    *,
    jobs: int = 2,
    progress: Callable[[int], None] | None = None,
    binaries: PgBinaries | None = None,
) -> int:
    """Copy `database` as of `snapshot` from `source` to `target`, which must not have it.

    pg_dump (directory format, `jobs` in parallel) into a fresh directory under `workdir`,
    then pg_restore --create from template1, which creates the database with its properties.
    `progress` gets the dump's size in bytes so far while it is written, and once at the
    end. Returns the dump's size; the dump directory is removed in every case.
    """
    bins = await _binaries(binaries)
    tmp = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="pgquorum-dump-", dir=workdir))
    dumpdir = tmp / "dump"
    try:
        dump = [
            *_tool(bins, "pg_dump", source, creds, database),
            "--format=directory",
            f"--jobs={jobs}",
            f"--snapshot={snapshot}",
            "--no-sync",  # the dump lives only until the restore has read it
            "--file",
            str(dumpdir),
        ]
        rc, _out, err = await _run(dump, creds, watch=dumpdir, progress=progress)
        if rc != 0:
            raise RestoreError(
                f"pg_dump of database {database!r} from {source.name} failed (exit {rc}): "
                f"{_tail(err)}"
            )
        size = await asyncio.to_thread(_du, dumpdir)
        if progress:
            progress(size)
        restore = [
            *_tool(bins, "pg_restore", target, creds, "template1"),
            "--create",
            "--exit-on-error",
            f"--jobs={jobs}",
            str(dumpdir),
        ]
        rc, _out, err = await _run(restore, creds)
        if rc != 0:
            raise RestoreError(
                f"pg_restore of database {database!r} onto {target.name} failed (exit {rc}): "
                f"{_tail(err)}"
            )
        return size
    finally:
        await asyncio.to_thread(shutil.rmtree, tmp, True)


# -- helpers ------------------------------------------------------------------------------------


async def _binaries(binaries: PgBinaries | None) -> PgBinaries:
    # find_binaries() runs `postgres --version`: not on the event loop.
    return binaries if binaries is not None else await asyncio.to_thread(find_binaries)


async def _open(node: Node, creds: Credentials, database: str) -> Link:
    params = {"user": creds.user, "database": database, "application_name": APPLICATION_NAME}
    return await Link.open(node, params, creds.password)


def _tool(bins: PgBinaries, tool: str, node: Node, creds: Credentials, database: str) -> list[str]:
    """A client tool's command line up to its options: where it connects, as whom."""
    # A host that is a directory is a Unix socket directory, for libpq as for the router.
    return [
        str(bins.path(tool)),
        "--host",
        node.host,
        "--port",
        str(node.port),
        "--username",
        creds.user,
        "--no-password",
        "--dbname",
        _dbname(database),
    ]


def _dbname(name: str) -> str:
    # A bare name containing "=" would be taken for a connection string.
    return "dbname=" + conninfo_quote(name)


async def _run(
    args: list[str],
    creds: Credentials,
    *,
    stdin: bytes | None = None,
    pgoptions: str | None = None,
    watch: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, bytes, bytes]:
    """Run a client tool; its exit code, stdout and stderr. With `watch` and `progress`, the
    size of directory `watch` goes to `progress` every PROGRESS_INTERVAL_S while it runs.
    The tool is killed if the caller is cancelled."""
    env = dict(os.environ)
    env.pop("PGPASSWORD", None)  # never an inherited password meant for something else
    if creds.password is not None:
        env["PGPASSWORD"] = creds.password
    env["PGCONNECT_TIMEOUT"] = str(CONNECT_TIMEOUT_S)  # an unreachable node is an error
    env["PGAPPNAME"] = APPLICATION_NAME
    if pgoptions is not None:
        env["PGOPTIONS"] = pgoptions
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        start_new_session=True,  # its own process group, with pg_dump's parallel workers
    )
    # communicate() drains both pipes, so a chatty tool never blocks on a full one.
    comm = asyncio.ensure_future(proc.communicate(stdin))
    try:
        if watch is not None and progress is not None:
            while not comm.done():
                await asyncio.wait({comm}, timeout=PROGRESS_INTERVAL_S)
                if not comm.done():
                    # Off the event loop: a dump of many tables is many files to stat.
                    progress(await asyncio.to_thread(_du, watch))
        out, err = await comm
        assert proc.returncode is not None
        return proc.returncode, out, err
    finally:
        if proc.returncode is None:  # cancelled: the tool must not outlive the recovery
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        comm.cancel()


def _du(path: Path) -> int:
    """Bytes in the files under `path` (0 while it does not exist yet)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def _tail(err: bytes) -> str:
    text = err.decode(errors="replace").strip()
    return text[-_STDERR_TAIL:] if text else "(no output)"
