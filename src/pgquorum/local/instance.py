"""One local PostgreSQL server living in a data directory.

When we run as root the server tools are run as the `postgres` system user,
because PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import math
import os
import pwd
import random
import re
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgquorum.local.binaries import PgBinaries

log = logging.getLogger(__name__)

#: Our settings live in this file, included from postgresql.conf, so that
#: ALTER SYSTEM (postgresql.auto.conf) can still override them.
CONF_FILE = "pgquorum.conf"
LOG_FILE = "server.log"
PID_FILE = "postmaster.pid"

# sun_path is 108 bytes on Linux (104 on BSD/macOS) including the NUL.
_MAX_SOCKET_PATH = 103


class PsqlError(RuntimeError):
    """psql exited with an error; `stderr` holds its message."""

    def __init__(self, message: str, *, returncode: int, stderr: str) -> None:
        super().__init__(message)
        self.returncode = returncode
        self.stderr = stderr


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


@functools.cache
def _postgres_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError(
            "running as root, but there is no 'postgres' system user to run PostgreSQL as "
            "(PostgreSQL refuses to run as root). Create one with: "
            "useradd --system --create-home postgres"
        ) from None


def run_as_postgres_kwargs() -> dict[str, Any]:
    """subprocess keyword arguments that run a server tool as a non-root user.

    Empty when we are not root. As root: user/group of the `postgres` account,
    no supplementary groups (so root's groups don't leak), and an env whose
    HOME/USER point at that account. The caller's cwd must be reachable by
    postgres (use cwd="/" if in doubt), else tools print a harmless warning.
    """
    if not _is_root():
        return {}
    pw = _postgres_account()
    env = dict(os.environ)
    env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [], "env": env}


_issued_ports: set[int] = set()
_ports_lock = threading.Lock()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now and was not handed out before by this process.

    Picks below the kernel's ephemeral range, so that outgoing client
    connections cannot grab the port between now and the server's start.
    """
    lo, _hi = _ephemeral_range()
    low_bound = 10000 if lo > 11000 else 1024
    with _ports_lock:
        for _ in range(500):
            port = random.randint(low_bound, lo - 1)
            if port not in _issued_ports and _bindable(host, port):
                _issued_ports.add(port)
                return port
        while True:  # fall back to letting the kernel choose
            with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in _issued_ports:
                _issued_ports.add(port)
                return port


@functools.cache
def _initdb_locale() -> str:
    # C.UTF-8 keeps byte-order collation (identical on every node and fast)
    # while allowing UTF-8 character classification; older systems lack it.
    try:
        out = subprocess.run(
            ["locale", "-a"], capture_output=True, text=True, timeout=10
        ).stdout.lower()
    except (OSError, subprocess.SubprocessError):
        return "C"
    return "C.UTF-8" if {"c.utf8", "c.utf-8"} & set(out.split()) else "C"


def _pid_alive(pid: int) -> bool:
    """True when `pid` exists and is not a zombie.

    Zombies matter: in containers PID 1 often reaps late or never, and a
    SIGKILLed postmaster would otherwise look alive.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except (OSError, IndexError):
        return True
    return fields[0] not in ("Z", "X")


def _is_postgres_process(pid: int) -> bool:
    """Guard against PID reuse after a crash: the pid must be a postgres binary."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return not Path("/proc/self").exists()
    except OSError:
        return True
    return comm in ("postgres", "postmaster")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _conf_quote(value: str | int) -> str:
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def conninfo_quote(value: str | int) -> str:
    s = str(value)
    if s and not re.search(r"[\s'\\]", s):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _hba_address(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "samehost"
    return f"{ip}/{ip.max_prefixlen}"


@dataclass
class LocalNode:
    """A PostgreSQL server in `datadir`, listening on `host`:`port` over TCP.

    The unix socket lives in the datadir, so nothing needs /var/run/postgresql.
    `password` / `superuser` are filled in by init(); pass them yourself when
    attaching to an already-initialised SCRAM datadir so psql()/dsn() work.
    """

    name: str
    datadir: Path
    port: int
    binaries: PgBinaries
    host: str = "127.0.0.1"
    password: str | None = None
    superuser: str = "postgres"

    def __post_init__(self) -> None:
        # pg_ctl runs with a different cwd, so relative paths would break.
        self.datadir = Path(self.datadir).absolute()

    # -- paths -----------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.datadir / LOG_FILE

    @property
    def conf_path(self) -> Path:
        return self.datadir / CONF_FILE

    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").is_file()

    # -- running tools ---------------------------------------------------------

    def _run_server_tool(
        self, args: list[str], *, timeout: float, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        kwargs = run_as_postgres_kwargs()
        # "/" is always reachable; root's cwd (e.g. /root) is not, for postgres.
        return subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            cwd="/",
            stdin=subprocess.DEVNULL,
            **kwargs,
        )

    def _write_owned(self, path: Path, text: str) -> None:
        """Write a file inside the datadir, owned by the server's user."""
        path.write_text(text)
        os.chmod(path, 0o600)
        if _is_root():
            pw = _postgres_account()
            os.chown(path, pw.pw_uid, pw.pw_gid)

    # -- init ------------------------------------------------------------------

    def _prepare_datadir(self) -> None:
        parent = self.datadir.parent
        parent.mkdir(parents=True, exist_ok=True)
        if not _is_root():
            return
        pw = _postgres_account()
        _make_traversable(parent, pw.pw_uid, pw.pw_gid)
        # Pre-create the datadir for postgres so initdb never needs write
        # access to the (root-owned) parent.
        created = False
        if not self.datadir.exists():
            self.datadir.mkdir(mode=0o700)
            created = True
        if created or not any(self.datadir.iterdir()):
            os.chown(self.datadir, pw.pw_uid, pw.pw_gid)

    def init(self, *, password: str | None = None, superuser: str = "postgres") -> None:
        """initdb the datadir and write our settings and pg_hba.conf.

        With a password the superuser gets it and TCP connections need SCRAM;
        local (unix socket) connections stay trust either way.
        """
        if self.initialized():
            raise RuntimeError(f"{self.name}: {self.datadir} is already initialized")
        self._prepare_datadir()
        host_auth = "scram-sha-256" if password is not None else "trust"
        args = [
            str(self.binaries.path("initdb")),
            "-D",
            str(self.datadir),
            "-U",
            superuser,
            "--auth-local=trust",
            f"--auth-host={host_auth}",
            "--encoding=UTF8",
            f"--locale={_initdb_locale()}",
        ]
        pwfile: str | None = None
        try:
            if password is not None:
                pwfile = self._make_pwfile(password)
                args.append(f"--pwfile={pwfile}")
            res = self._run_server_tool(args, timeout=300)
        finally:
            if pwfile:
                os.unlink(pwfile)
        if res.returncode != 0:
            raise RuntimeError(
                f"{self.name}: initdb failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}"
            )
        self.password = password
        self.superuser = superuser
        self._write_config(scram=password is not None)

    @staticmethod
    def _make_pwfile(password: str) -> str:
        fd, path = tempfile.mkstemp(prefix="pgquorum-pw-")
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        if _is_root():
            pw = _postgres_account()
            os.chown(path, pw.pw_uid, pw.pw_gid)
        return path

    @property
    def router_host(self) -> str:
        """What a router on this machine should connect to: the Unix-socket directory when the
        server listens on one (cheaper than loopback TCP), else the TCP host."""
        return self._socket_dir() or self.host

    def _socket_dir(self) -> str:
        # A too-long socket path makes the server refuse to start; TCP alone
        # is enough for us (pg_ctl -w waits on postmaster.pid, not a socket).
        if len(str(self.datadir)) + len("/.s.PGSQL.65535") > _MAX_SOCKET_PATH:
            return ""
        return str(self.datadir)

    def _settings(self, *, scram: bool) -> dict[str, str | int]:
        settings: dict[str, str | int] = {
            "listen_addresses": self.host,
            "port": self.port,
            "unix_socket_directories": self._socket_dir(),
            "max_connections": 300,
            # Two-phase commit needs prepared transactions enabled.
            "max_prepared_transactions": 300,
            "shared_buffers": "128MB",
            "logging_collector": "off",
            "log_min_messages": "warning",
        }
        if scram:
            settings["password_encryption"] = "scram-sha-256"  # default only on 14+
        return settings

    def _write_config(self, *, scram: bool) -> None:
        lines = [f"# Written by pgquorum for node {self.name}; ALTER SYSTEM overrides it."]
        lines += [f"{k} = {_conf_quote(v)}" for k, v in self._settings(scram=scram).items()]
        self._write_owned(self.conf_path, "\n".join(lines) + "\n")

        main_conf = self.datadir / "postgresql.conf"
        text = main_conf.read_text()
        include = f"include '{CONF_FILE}'"
        if include not in text:
            with main_conf.open("a") as f:
                f.write(f"\n# pgquorum settings\n{include}\n")

        method = "scram-sha-256" if scram else "trust"
        addr = _hba_address(self.host)
        hba = [
            "# Written by pgquorum.",
            "# TYPE  DATABASE     USER  ADDRESS  METHOD",
            "local   all          all            trust",
            "local   replication  all            trust",
            f"host    all          all   {addr}  {method}",
            f"host    replication  all   {addr}  {method}",
        ]
        self._write_owned(self.datadir / "pg_hba.conf", "\n".join(hba) + "\n")

    def _sync_conf_port(self) -> None:
        """Keep the stored port equal to self.port, so a plain pg_ctl start agrees."""
        try:
            text = self.conf_path.read_text()
        except FileNotFoundError:
            return
        new, n = re.subn(r"(?m)^port = \d+$", f"port = {self.port}", text)
        if n and new != text:
            self._write_owned(self.conf_path, new)

    # -- lifecycle ----------------------------------------------------------------

    def postmaster_pid(self) -> int | None:
        """PID from postmaster.pid, or None if absent/unreadable (may be stale)."""
        try:
            first = (self.datadir / PID_FILE).read_text().split("\n", 1)[0].strip()
            return int(first)
        except (OSError, ValueError):
            return None

    def _pidfile_port(self) -> int | None:
        try:
            lines = (self.datadir / PID_FILE).read_text().split("\n")
            return int(lines[3])
        except (OSError, ValueError, IndexError):
            return None

    def is_running(self) -> bool:
        pid = self.postmaster_pid()
        return pid is not None and _pid_alive(pid) and _is_postgres_process(pid)

    def _clear_stale_lock_files(self) -> None:
        """Remove postmaster.pid / socket lock files naming a zombie or a reused pid.

        The server ignores lock files whose process is gone, but not those whose
        pid still exists: a SIGKILLed postmaster stays a zombie when PID 1 does
        not reap (common in containers), which would block every restart.
        """
        if self.is_running():
            return
        locks = [self.datadir / PID_FILE, *self.datadir.glob(".s.PGSQL.*.lock")]
        for lock in locks:
            try:
                pid = int(lock.read_text().split("\n", 1)[0].strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue  # gone: the server handles this itself (and checks shared memory)
            except PermissionError:
                pass
            if _pid_alive(pid) and _is_postgres_process(pid):
                continue  # e.g. an orphaned backend; let the server refuse to start
            log.info("%s: removing stale %s (pid %d)", self.name, lock.name, pid)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()

    def _log_tail(self, since: int = 0, lines: int = 40) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(since)
                data = f.read().decode(errors="replace")
        except OSError as e:
            return f"(no server log: {e})"
        return "\n".join(data.splitlines()[-lines:])

    def start(self, timeout: float = 60) -> None:
        """Start the server on self.port and wait until it accepts connections."""
        if not self.initialized():
            raise RuntimeError(f"{self.name}: {self.datadir} is not initialized")
        if self.is_running():
            running_port = self._pidfile_port()
            if running_port == self.port:
                return
            raise RuntimeError(
                f"{self.name}: already running on port {running_port}, not {self.port}"
            )
        self._clear_stale_lock_files()
        self._sync_conf_port()
        try:
            log_offset = self.log_path.stat().st_size
        except OSError:
            log_offset = 0
        args = [
            str(self.binaries.path("pg_ctl")),
            "start",
            "-w",
            "-t",
            str(max(1, math.ceil(timeout))),
            "-D",
            str(self.datadir),
            "-l",
            str(self.log_path),
            "-o",
            f"-p {int(self.port)}",
        ]
        try:
            res = self._run_server_tool(args, timeout=timeout + 30)
            ok, out = res.returncode == 0, f"{res.stdout}{res.stderr}".strip()
        except subprocess.TimeoutExpired:
            ok, out = False, "pg_ctl timed out"
        if not ok or not self.is_running():
            raise RuntimeError(
                f"{self.name}: server failed to start on port {self.port}: {out}\n"
                f"--- {self.log_path} (tail) ---\n{self._log_tail(log_offset)}"
            )

    def stop(self, mode: str = "fast", timeout: float = 60) -> None:
        """pg_ctl stop; a no-op when the server is not running."""
        if not self.is_running():
            return
        args = [
            str(self.binaries.path("pg_ctl")),
            "stop",
            "-w",
            "-t",
            str(max(1, math.ceil(timeout))),
            "-m",
            mode,
            "-D",
            str(self.datadir),
        ]
        res = self._run_server_tool(args, timeout=timeout + 30)
        if res.returncode != 0 and self.is_running():
            raise RuntimeError(
                f"{self.name}: pg_ctl stop -m {mode} failed: {res.stdout}{res.stderr}".strip()
            )

    def kill(self, timeout: float = 10) -> None:
        """Crash the server: SIGKILL the postmaster and all its processes.

        Backends are killed too (they are not in the postmaster's process
        group), and we wait for them, so a following start() does not trip
        over a still-attached shared memory segment.
        """
        pid = self.postmaster_pid()
        if pid is None or not self.is_running():
            return
        # Freeze the postmaster first so it cannot fork while we collect its tree.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        victims = [pid, *_descendants(pid)]
        for p in victims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while any(_pid_alive(p) for p in victims):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: processes survived SIGKILL: {victims}")
            time.sleep(0.02)

    # -- clients -------------------------------------------------------------------

    def psql(
        self,
        sql: str,
        *,
        database: str = "postgres",
        user: str = "postgres",
        password: str | None = None,
        timeout: float = 120,
    ) -> str:
        """Run `sql` with psql over TCP; return its unaligned, tuples-only output.

        The trailing newline is stripped. Raises PsqlError (with stderr) on any
        error. `password` defaults to the stored superuser password.
        """
        env = dict(os.environ)
        if password is None and user == self.superuser:
            password = self.password
        if password is not None:
            env["PGPASSWORD"] = password
        args = [
            str(self.binaries.path("psql")),
            "-X",  # ignore ~/.psqlrc
            "-A",
            "-t",
            "-q",  # no command tags such as "INSERT 0 1"
            "-w",  # never prompt for a password (would hang)
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-U",
            user,
            "-d",
            database,
            "-c",
            sql,
        ]
        res = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        if res.returncode != 0:
            raise PsqlError(
                f"{self.name}: psql failed (exit {res.returncode}): {res.stderr.strip()}",
                returncode=res.returncode,
                stderr=res.stderr,
            )
        return res.stdout.removesuffix("\n")

    def dsn(self, database: str = "postgres", user: str = "postgres") -> str:
        """libpq keyword/value connection string (with the password when known)."""
        parts: dict[str, str | int] = {
            "host": self.host,
            "port": self.port,
            "dbname": database,
            "user": user,
        }
        s = " ".join(f"{k}={conninfo_quote(v)}" for k, v in parts.items())
        if self.password is not None and user == self.superuser:
            s += f" password={conninfo_quote(self.password)}"
        return s


def _make_traversable(path: Path, uid: int, gid: int) -> None:
    """Give uid/gid search (x) permission on `path` and all its ancestors.

    Only the search bit is added, never read/write, so the directories'
    contents stay unlistable; e.g. a 0700 mkdtemp() dir becomes 0701.
    """
    for d in [path, *path.parents]:
        st = os.stat(d)
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            log.info("granting search permission on %s so the postgres user can reach it", d)
            os.chmod(d, stat.S_IMODE(st.st_mode) | bit)
