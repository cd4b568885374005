"""Finding the PostgreSQL server binaries (initdb, pg_ctl, postgres) on this machine."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: Tools a directory must contain to be usable for running local servers.
REQUIRED_TOOLS = ("initdb", "pg_ctl", "postgres")

#: Environment variable that pins the binary directory explicitly.
BINDIR_ENV = "PGQUORUM_PG_BINDIR"

#: Well-known install locations searched after pg_config and PATH (globs allowed).
#: Module-level so tests can monkeypatch it away.
FIXED_SEARCH_DIRS: tuple[str, ...] = (
    "/usr/lib/postgresql/*/bin",  # Debian/Ubuntu, one directory per major version
    "/usr/pgsql-*/bin",  # PGDG RPMs
    "/usr/local/pgsql/bin",  # source builds
    "/opt/homebrew/opt/postgresql@*/bin",
    "/usr/local/opt/postgresql@*/bin",
)

_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)")


class PostgresNotFound(Exception):
    """No usable PostgreSQL server installation was found."""

    def __init__(self, detail: str = "") -> None:
        self.detail = detail
        super().__init__(self._message())

    def _message(self) -> str:
        msg = "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found."
        if self.detail:
            msg += f" {self.detail}"
        return f"{msg} {install_hint()}"


def install_hint() -> str:
    """How to install the server on this machine, as one sentence."""
    sudo = "" if hasattr(os, "geteuid") and os.geteuid() == 0 else "sudo "
    if shutil.which("apt-get"):
        cmd = f"{sudo}apt-get install -y postgresql"
    elif shutil.which("dnf"):
        cmd = f"{sudo}dnf install -y postgresql-server"
    elif shutil.which("yum"):
        cmd = f"{sudo}yum install -y postgresql-server"
    elif shutil.which("apk"):
        cmd = f"{sudo}apk add postgresql"
    elif shutil.which("brew"):
        cmd = "brew install postgresql"
    else:
        return (
            "Install the PostgreSQL server package for your system "
            "(https://www.postgresql.org/download/) "
            f"or set {BINDIR_ENV} to the directory containing initdb."
        )
    return f"Install them with: {cmd} (or set {BINDIR_ENV} to the directory containing initdb)"


@dataclass(frozen=True)
class PgBinaries:
    """A PostgreSQL binary directory and its major version."""

    bindir: Path
    version: int

    def path(self, tool: str) -> Path:
        """Absolute path of `tool` (e.g. "initdb", "psql", "pgbench") in this bindir.

        Raises FileNotFoundError when the tool is not installed there, rather than
        falling back to PATH, so we never mix binaries from different versions.
        """
        p = self.bindir / tool
        if not p.is_file():
            raise FileNotFoundError(f"{tool} not found in {self.bindir}")
        return p

    def has(self, tool: str) -> bool:
        return (self.bindir / tool).is_file()


def _usable(d: Path) -> bool:
    return all(os.access(d / t, os.X_OK) and (d / t).is_file() for t in REQUIRED_TOOLS)


def _resolve_bindir(d: Path) -> Path:
    # PATH entries such as /usr/local/bin may only hold symlinks to the three
    # required tools; follow initdb to the real directory so psql, pg_dump etc.
    # come from the same installation.
    return (d / "initdb").resolve().parent


def _pg_config_bindir() -> Path | None:
    exe = shutil.which("pg_config")
    if not exe:
        return None
    try:
        out = subprocess.run(
            [exe, "--bindir"], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(out) if out else None


def default_candidates() -> list[Path]:
    """Directories that may hold the server binaries, in search order."""
    cands: list[Path] = []
    pgc = _pg_config_bindir()
    if pgc:
        cands.append(pgc)
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if entry:
            cands.append(Path(entry))
    for pattern in FIXED_SEARCH_DIRS:
        cands.extend(Path(p) for p in sorted(glob.glob(pattern)))
    return cands


def server_version(bindir: Path) -> int:
    """Major version reported by `postgres --version` (safe to run as root)."""
    out = subprocess.run(
        [str(bindir / "postgres"), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    m = _VERSION_RE.search(out)
    if not m:
        raise ValueError(f"cannot parse PostgreSQL version from {out!r}")
    return int(m.group(1))


def _probe(d: Path, seen: set[Path] | None = None) -> PgBinaries | None:
    """PgBinaries for directory `d`, or None if unusable or (real dir) already in `seen`."""
    if not _usable(d):
        return None
    real = _resolve_bindir(d)
    if not _usable(real):
        real = d
    if seen is not None:
        if real in seen:
            return None
        seen.add(real)
    try:
        return PgBinaries(bindir=real, version=server_version(real))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def find_binaries(candidates: Iterable[Path | str] | None = None) -> PgBinaries:
    """Locate initdb/pg_ctl/postgres; the newest major version wins.

    With `candidates` given, only those directories are considered. Otherwise
    $PGQUORUM_PG_BINDIR, when set, is authoritative (an explicit choice beats
    "newest", and a wrong value is an error rather than silently ignored);
    without it we search `pg_config --bindir`, PATH and FIXED_SEARCH_DIRS.
    """
    if candidates is None:
        pinned = os.environ.get(BINDIR_ENV)
        if pinned:
            found = _probe(Path(pinned))
            if found is None:
                raise PostgresNotFound(
                    f"{BINDIR_ENV}={pinned} does not contain working initdb, pg_ctl and postgres."
                )
            return found
        candidates = default_candidates()

    best: PgBinaries | None = None
    seen: set[Path] = set()  # real bindirs already probed (PATH symlinks, pg_config, globs)
    for c in candidates:
        found = _probe(Path(c), seen)
        if found is not None and (best is None or found.version > best.version):
            best = found
    if best is None:
        raise PostgresNotFound()
    return best
