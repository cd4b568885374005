#!/usr/bin/env python3
"""pgbench side by side: one PostgreSQL node vs. the pgquorum router vs. pgpool-II.

Starts real PostgreSQL servers on loopback (one alone for the direct
measurement, three behind the router / pgpool-II), and, as the reference for
what one proxy hop costs on this machine, PgBouncer in front of the single node
when it is installed. Runs pgbench
initialisation, select-only (simple and prepared protocol) and the default
TPC-B-like script against each target, and prints a comparison table.

Everything started here is stopped again at the end, also on Ctrl-C or error.
Run `python bench/bench.py --help` for the options; see bench/README.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.table import Table

from pgquorum.local.binaries import PgBinaries, find_binaries
from pgquorum.local.instance import LocalNode, PsqlError, free_port, run_as_postgres_kwargs

console = Console(stderr=True, highlight=False)

TARGETS = ("direct", "relay", "router", "fanout", "pgpool", "pgbouncer")
TARGET_TITLES = {
    "direct": "direct (1 node)",
    "relay": "bare Python relay, bench/ceiling.py (1 node, bytes copied, no parsing)",
    "router": "pgquorum router (3 nodes)",
    "fanout": "bare Python two-phase-commit fan-out, bench/ceiling.py (3 nodes, TPC-B only)",
    "pgpool": "pgpool-II native replication (3 nodes)",
    "pgbouncer": "PgBouncer, session pooling (1 node, no replication)",
}


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    args: tuple[str, ...]  # extra pgbench arguments; empty for the init step
    is_init: bool = False


WORKLOADS = (
    Workload("init", "init (-i)", (), is_init=True),
    Workload("select", "-S", ("-S",)),
    Workload("select_prepared", "-S -M prepared", ("-S", "-M", "prepared")),
    Workload("tpcb", "TPC-B (default)", ()),
)


@dataclass
class Result:
    target: str
    workload: str
    ok: bool
    seconds: float | None = None  # wall clock (init only)
    tps: float | None = None
    latency_ms: float | None = None
    transactions: int | None = None
    failed_transactions: int | None = None
    init_steps: str = ""  # pgbench -i's own breakdown ("drop tables 0.00 s, ...")
    note: str = ""
    log: str = ""


@dataclass
class Run:
    started: str
    host: dict[str, Any]
    settings: dict[str, Any]
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log_dir: str = ""

    def get(self, target: str, workload: str) -> Result | None:
        for r in self.results:
            if r.target == target and r.workload == workload:
                return r
        return None


# -- host information -----------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pg_version(binaries: PgBinaries) -> str:
    try:
        out = subprocess.run(
            [str(binaries.path("postgres")), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return str(binaries.version)
    m = re.search(r"\(PostgreSQL\)\s+(.*)", out)
    return m.group(1).strip() if m else (out or str(binaries.version))


def pgpool_version(pgpool: str) -> tuple[str, tuple[int, int]]:
    out = subprocess.run([pgpool, "--version"], capture_output=True, text=True, timeout=30)
    text = (out.stdout + out.stderr).strip()
    m = re.search(r"version (\d+)\.(\d+)", text)
    return text, ((int(m.group(1)), int(m.group(2))) if m else (0, 0))


def pgbouncer_version(pgbouncer: str) -> str:
    out = subprocess.run([pgbouncer, "--version"], capture_output=True, text=True, timeout=30)
    return (out.stdout + out.stderr).strip().splitlines()[0]


# -- process helpers ------------------------------------------------------------


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}:\n{tail(log)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f}s:\n{tail(log)}")


def stop_process(proc: subprocess.Popen[bytes], what: str, sig: int = signal.SIGTERM) -> None:
    """Stop a process we started in its own session (and whatever it forked)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            console.print(f"[yellow]{what} did not stop on signal {sig}; killing it[/]")
    # Children (pgpool's pool processes) may outlive the parent briefly.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(text.splitlines()[-lines:])


def chown_postgres(path: Path) -> None:
    kw = run_as_postgres_kwargs()
    if kw:
        os.chown(path, kw["user"], kw["group"])


# -- pgbench ----------------------------------------------------------------------

TPS_RE = re.compile(r"^tps = ([\d.]+) \(without initial connection time\)", re.M)
TPS_ANY_RE = re.compile(r"^tps = ([\d.]+)", re.M)
LAT_RE = re.compile(r"^latency average = ([\d.]+) ms", re.M)
XACT_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.M)
INIT_DONE_RE = re.compile(r"^done in [\d.]+ s \((.*)\)\.$", re.M)


class Bench:
    def __init__(self, args: argparse.Namespace, binaries: PgBinaries, log_dir: Path) -> None:
        self.args = args
        self.binaries = binaries
        self.log_dir = log_dir
        self.pgbench = str(binaries.path("pgbench"))

    def _run(
        self, target: str, name: str, port: int, db: str, extra: list[str], timeout: float
    ) -> tuple[int, str, float, Path]:
        log = self.log_dir / f"pgbench-{target}-{name}.log"
        cmd = [self.pgbench, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", *extra, db]
        env = dict(os.environ, PGCONNECT_TIMEOUT="10")
        env.pop("PGPASSWORD", None)
        t0 = time.monotonic()
        try:
            res = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                stdin=subprocess.DEVNULL,
            )
            rc, out = res.returncode, res.stdout + res.stderr
        except subprocess.TimeoutExpired as e:
            rc = -1
            out = _text(e.stdout) + _text(e.stderr) + f"\n(timed out after {timeout:.0f}s)"
        elapsed = time.monotonic() - t0
        log.write_text("$ " + " ".join(cmd) + "\n" + out)
        return rc, out, elapsed, log

    def init(self, target: str, port: int, db: str) -> Result:
        args = ["-i", "-s", str(self.args.scale), "-q"]
        rc, out, elapsed, log = self._run(target, "init", port, db, args, timeout=1800)
        if rc == 0:
            m = INIT_DONE_RE.search(out)
            steps = m.group(1) if m else ""
            return Result(target, "init", True, seconds=elapsed, init_steps=steps, log=str(log))
        self._report_failure(target, "init", log)
        return Result(target, "init", False, note=f"exit {rc}", log=str(log))

    def run(self, target: str, w: Workload, port: int, db: str) -> Result:
        d = self.args.duration
        args = [
            *w.args,
            "-T",
            str(d),
            "-c",
            str(self.args.clients),
            "-j",
            str(self.args.jobs),
            "-n",
        ]
        rc, out, _elapsed, log = self._run(target, w.key, port, db, args, timeout=d * 4 + 120)
        tps = TPS_RE.search(out) or TPS_ANY_RE.search(out)
        lat = LAT_RE.search(out)
        xacts = XACT_RE.search(out)
        failed = FAILED_RE.search(out)
        if rc != 0 or not tps:
            self._report_failure(target, w.key, log)
            return Result(target, w.key, False, note=f"exit {rc}", log=str(log))
        return Result(
            target,
            w.key,
            True,
            tps=float(tps.group(1)),
            latency_ms=float(lat.group(1)) if lat else None,
            transactions=int(xacts.group(1)) if xacts else None,
            failed_transactions=int(failed.group(1)) if failed else None,
            log=str(log),
        )

    @staticmethod
    def _report_failure(target: str, workload: str, log: Path) -> None:
        console.print(f"[red]FAILED: {target} / {workload}[/] (log: {log})")
        console.print(textwrap.indent(tail(log), "    "), markup=False)


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


# -- the targets ------------------------------------------------------------------


def start_nodes(binaries: PgBinaries, data_dir: Path, names: list[str]) -> list[LocalNode]:
    nodes = [LocalNode(n, data_dir / n, free_port(), binaries) for n in names]

    def up(node: LocalNode) -> None:
        node.init()
        node.start()

    with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
        for f in [pool.submit(up, n) for n in nodes]:
            f.result()
    return nodes


@contextlib.contextmanager
def serving(
    cmd: list[str], name: str, port: int, log: Path, stop: signal.Signals, **popen: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server process logging to ``log`` until it listens on ``port``; stop it after."""
    with log.open("ab") as logf:
        proc = subprocess.Popen(
            cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **popen,
        )
    try:
        wait_for_port(port, proc, name, log, timeout=60)
        yield proc
    finally:
        stop_process(proc, name, stop)


@contextlib.contextmanager
def router(nodes: list[LocalNode], work: Path, log_dir: Path, workers: str) -> Iterator[int]:
    port = free_port()
    conf = work / "router.toml"
    lines = [
        "[router]",
        f'listen = "127.0.0.1:{port}"',
        'auth_method = "trust"',
        'read_policy = "balance"',
        f"workers = {workers}" if workers.isdigit() else f'workers = "{workers}"',
        "[group]",
        'name = "default"',
    ]
    for n in nodes:
        lines += [
            "[[group.nodes]]",
            f'name = "{n.name}"',
            f'host = "{n.router_host}"',
            f"port = {n.port}",
        ]
    conf.write_text("\n".join(lines) + "\n")
    shutil.copy(conf, log_dir / "router.toml")
    exe = Path(sys.executable).parent / "pgquorum"
    cmd = [str(exe) if exe.exists() else "pgquorum", "router", "--config", str(conf)]
    with serving(cmd, "pgquorum router", port, log_dir / "router.log", signal.SIGTERM) as proc:
        yield port
    if proc.returncode not in (0, -signal.SIGTERM, None):
        console.print(f"[yellow]router exited with code {proc.returncode}[/]")


@contextlib.contextmanager
def ceiling(mode: str, nodes: list[LocalNode], log_dir: Path, workers: str) -> Iterator[int]:
    """bench/ceiling.py's bare proxy: what any Python router could reach here."""
    port = free_port()
    n = nproc() if workers == "auto" else int(workers)
    cmd = [sys.executable, str(Path(__file__).with_name("ceiling.py")), mode]
    cmd += ["--port", str(port), "--workers", str(n)]
    for node in nodes:
        cmd += ["--node", f"{node.router_host}:{node.port}"]
    with serving(cmd, f"ceiling {mode}", port, log_dir / f"ceiling-{mode}.log", signal.SIGTERM):
        yield port


def find_program(name: str) -> str | None:
    """An installed program (Debian puts pgpool and pgbouncer in /usr/sbin, off a user's
    PATH)."""
    for cand in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/local/bin/{name}"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


@contextlib.contextmanager
def pgpool(
    exe: str, nodes: list[LocalNode], work: Path, log_dir: Path, clients: int
) -> Iterator[int]:
    pool_dir = work / "pgpool"
    pool_dir.mkdir()
    chown_postgres(pool_dir)
    _text_version, ver = pgpool_version(exe)
    port, pcp_port, wd_port, hb_port = free_port(), free_port(), free_port(), free_port()
    sock_key = "unix_socket_directories" if ver >= (4, 4) else "socket_dir"
    pcp_sock_key = "pcp_unix_socket_directories" if ver >= (4, 4) else "pcp_socket_dir"
    settings: dict[str, str | int] = {
        "backend_clustering_mode": "native_replication",
        "listen_addresses": "127.0.0.1",
        "port": port,
        sock_key: str(pool_dir),
        "pcp_listen_addresses": "127.0.0.1",
        "pcp_port": pcp_port,
        pcp_sock_key: str(pool_dir),
        "wd_ipc_socket_dir": str(pool_dir),
        "wd_port0": wd_port,
        "heartbeat_port0": hb_port,
        "pid_file_name": str(pool_dir / "pgpool.pid"),
        "logdir": str(pool_dir),
        "log_destination": "stderr",
        "enable_pool_hba": "off",
        "pool_passwd": "",
        "num_init_children": clients + 4,
        "max_pool": 2,
        "load_balance_mode": "on",
        "replication_stop_on_mismatch": "off",
        "failover_on_backend_error": "off",
        "health_check_period": 0,
        "sr_check_period": 0,
        "use_watchdog": "off",
        "memory_cache_enabled": "off",
        "memqcache_oiddir": str(pool_dir / "oiddir"),
    }
    for i, n in enumerate(nodes):
        # Like the router, pgpool reaches the nodes through their Unix sockets.
        settings[f"backend_hostname{i}"] = n.router_host
        settings[f"backend_port{i}"] = n.port
        settings[f"backend_weight{i}"] = 1
        settings[f"backend_flag{i}"] = "ALLOW_TO_FAILOVER"
        settings[f"backend_data_directory{i}"] = str(n.datadir)
    conf = pool_dir / "pgpool.conf"
    conf.write_text(
        "".join(
            f"{k} = {v}\n" if isinstance(v, int) or v in ("on", "off") else f"{k} = '{v}'\n"
            for k, v in settings.items()
        )
    )
    pcp = pool_dir / "pcp.conf"
    pcp.write_text("")
    for f in (conf, pcp):
        chown_postgres(f)
    shutil.copy(conf, log_dir / "pgpool.conf")
    cmd = [exe, "-n", "-f", str(conf), "-F", str(pcp)]
    kwargs = run_as_postgres_kwargs()  # pgpool works as root, but there is no need for it
    # SIGINT = pgpool's "fast" shutdown.
    with serving(
        cmd, "pgpool", port, log_dir / "pgpool.log", signal.SIGINT, cwd=str(pool_dir), **kwargs
    ):
        yield port


@contextlib.contextmanager
def pgbouncer(
    exe: str, node: LocalNode, db: str, work: Path, log_dir: Path, clients: int
) -> Iterator[int]:
    """PgBouncer in front of one node: it only forwards (no SQL analysis, no replication),
    so its column shows what one proxy hop in between costs on this machine."""
    bouncer_dir = work / "pgbouncer"
    bouncer_dir.mkdir()
    port = free_port()
    users = bouncer_dir / "users.txt"
    users.write_text('"postgres" ""\n')
    ini = bouncer_dir / "pgbouncer.ini"
    ini.write_text(
        "[databases]\n"
        # Like the router, it reaches the node through its Unix socket.
        f"{db} = host={node.router_host} port={node.port} dbname={db}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = trust\n"
        f"auth_file = {users}\n"
        "pool_mode = session\n"
        f"max_client_conn = {clients + 10}\n"
        f"default_pool_size = {clients + 2}\n"
    )
    chown_postgres(bouncer_dir)
    for f in (users, ini):
        chown_postgres(f)
    shutil.copy(ini, log_dir / "pgbouncer.ini")
    kwargs = run_as_postgres_kwargs()  # PgBouncer refuses to run as root
    with serving(
        [exe, str(ini)], "pgbouncer", port, log_dir / "pgbouncer.log", signal.SIGTERM, **kwargs
    ):
        yield port


def psql_port(binaries: PgBinaries, port: int, sql: str, database: str = "postgres") -> str:
    res = subprocess.run(
        [
            str(binaries.path("psql")),
            "-X",
            "-A",
            "-t",
            "-q",
            "-w",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            "postgres",
            "-d",
            database,
            "-c",
            sql,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    if res.returncode != 0:
        raise RuntimeError(f"psql on port {port} failed: {res.stderr.strip()}")
    return res.stdout.strip()


def ensure_database(
    run: Run, binaries: PgBinaries, port: int, nodes: list[LocalNode], db: str, what: str
) -> None:
    """CREATE DATABASE through the proxy; fall back to each node when it doesn't fan out."""
    try:
        psql_port(binaries, port, f"CREATE DATABASE {db}")
    except RuntimeError as e:
        console.print(f"[yellow]{what}: CREATE DATABASE through the proxy failed: {e}[/]")
    missing = [
        n for n in nodes if n.psql(f"SELECT 1 FROM pg_database WHERE datname = '{db}'") != "1"
    ]
    if missing:
        names = ", ".join(n.name for n in missing)
        note = f"{what}: CREATE DATABASE did not reach {names}; created it there directly"
        console.print(f"[yellow]{note}[/]")
        run.notes.append(note)
        for n in missing:
            n.psql(f"CREATE DATABASE {db}")


def drop_database(nodes: list[LocalNode], db: str) -> None:
    for n in nodes:
        with contextlib.suppress(PsqlError):
            n.psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def check_consistency(run: Run, nodes: list[LocalNode], db: str, what: str) -> None:
    """After the runs, the three replicas should hold the same balances."""
    sql = (
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts) || '/' || "
        "(SELECT sum(bbalance) FROM pgbench_branches) || '/' || "
        "(SELECT count(*) FROM pgbench_history)"
    )
    states = {}
    for n in nodes:
        try:
            states[n.name] = n.psql(sql, database=db)
        except PsqlError as e:
            states[n.name] = f"error: {e.stderr.strip()}"
    if len(set(states.values())) > 1:
        note = (
            f"{what}: replicas differ after the run "
            f"(sum abalance/sum bbalance/history rows): {states}"
        )
        console.print(f"[red]{note}[/]")
        run.notes.append(note)
    else:
        console.print(f"  {what}: replicas agree ({next(iter(states.values()))})")


def run_target(
    run: Run,
    bench: Bench,
    target: str,
    port: int,
    db: str,
    workloads: tuple[Workload, ...] = WORKLOADS,
) -> None:
    console.rule(f"[bold]{TARGET_TITLES[target]}[/] (port {port}, database {db})")
    for w in workloads:
        if w.is_init:
            console.print(f"  pgbench -i -s {bench.args.scale} ...")
            r = bench.init(target, port, db)
            run.results.append(r)
            if r.ok:
                console.print(f"    {r.seconds:.1f} s ({r.init_steps})")
            else:
                for rest in WORKLOADS[1:]:
                    run.results.append(Result(target, rest.key, False, note="init failed"))
                return
            continue
        console.print(f"  {w.title} for {bench.args.duration}s ...")
        r = bench.run(target, w, port, db)
        run.results.append(r)
        if r.ok:
            console.print(f"    {r.tps:.0f} tps, {r.latency_ms} ms")


# -- output -----------------------------------------------------------------------


def _fmt_cell(r: Result | None, *, init: bool) -> tuple[str, str]:
    if r is None:
        return ("skipped", "")
    if not r.ok:
        return ("FAILED", "")
    if init:
        return (f"{r.seconds:.1f} s", "")
    lat = f"{r.latency_ms:.3f} ms" if r.latency_ms is not None else "?"
    return (f"{r.tps:,.0f}", lat)


def _ratio(run: Run, target: str, w: Workload) -> str:
    a, b = run.get(target, w.key), run.get("direct", w.key)
    if not (a and b and a.ok and b.ok):
        return "-"
    if w.is_init:
        # Time ratio: >1 means slower than direct.
        return f"{a.seconds / b.seconds:.2f}x time" if a.seconds and b.seconds else "-"
    return f"{a.tps / b.tps:.2f}" if a.tps and b.tps else "-"


def columns(run: Run) -> list[str]:
    return [t for t in TARGETS if t in run.settings["targets"]]


def table_rows(run: Run) -> tuple[list[str], list[list[str]]]:
    targets = columns(run)
    header = ["workload"]
    for t in targets:
        header += [f"{t} tps", f"{t} latency"]
    for t in targets[1:]:
        header.append(f"{t}/direct")
    rows = []
    for w in WORKLOADS:
        row = [w.title]
        for t in targets:
            row += list(_fmt_cell(run.get(t, w.key), init=w.is_init))
        for t in targets[1:]:
            row.append(_ratio(run, t, w) if "direct" in targets else "-")
        rows.append(row)
    return header, rows


def header_line(run: Run) -> str:
    h = run.host
    s = run.settings
    return (
        f"{run.started}, nproc {h['nproc']}, {h['cpu']}, PostgreSQL {h['postgresql']}; "
        f"pgbench scale {s['scale']}, {s['clients']} clients, {s['jobs']} jobs, "
        f"{s['duration']} s per run"
    )


def print_table(run: Run) -> None:
    header, rows = table_rows(run)
    table = Table(title=header_line(run), title_justify="left")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    out = Console(width=None if sys.stdout.isatty() else 160)
    out.print(table)
    out.print(
        "tps columns: transactions/s without connection time (init row: wall-clock seconds); "
        "ratio = tps / direct tps (init row: time / direct time)."
    )
    for n in run.notes:
        out.print(f"[yellow]note:[/] {n}")


def markdown(run: Run) -> str:
    header, rows = table_rows(run)
    h = run.host
    lines = [
        f"### pgbench, {run.started}",
        "",
        f"- machine: nproc {h['nproc']}, {h['cpu']}",
        f"- PostgreSQL {h['postgresql']}"
        + "".join(f", {h[k]}" for k in ("pgpool", "pgbouncer") if h.get(k)),
        f"- pgbench scale {run.settings['scale']}, {run.settings['clients']} clients, "
        f"{run.settings['jobs']} jobs, {run.settings['duration']} s per run, all on loopback",
        f"- router workers: {run.settings.get('router_workers', 1)}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [
        "",
        "tps without initial connection time; latency = pgbench latency average. "
        "Ratio = tps / direct tps; for the init row, time / direct time (higher = slower).",
    ]
    for n in run.notes:
        lines.append(f"\nNote: {n}")
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--clients", "-c", type=int, default=8, help="pgbench clients (default 8)")
    p.add_argument("--jobs", "-j", type=int, default=2, help="pgbench threads (default 2)")
    p.add_argument("--duration", "-T", type=int, default=20, help="seconds per run (default 20)")
    p.add_argument("--scale", "-s", type=int, default=10, help="pgbench scale factor (default 10)")
    p.add_argument("--quick", action="store_true", help="smoke run: 5 s per run")
    p.add_argument(
        "--router-workers",
        default="auto",
        help='router processes sharing the port: a number, or "auto" for one per CPU '
        "(default auto)",
    )
    p.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help="comma-separated subset of direct,relay,router,fanout,pgpool,pgbouncer (default: all)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument(
        "--markdown",
        metavar="FILE",
        nargs="?",
        const="-",
        help="also write a Markdown table (to FILE, or stdout when no FILE is given)",
    )
    p.add_argument(
        "--log-dir",
        metavar="DIR",
        help="keep pgbench/router/pgpool/pgbouncer logs here (default: a new temp dir, kept)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.duration = 5
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        p.error(f"unknown target(s): {', '.join(bad)}")
    args.targets = targets
    return args


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    binaries = find_binaries()
    log_dir = (
        Path(args.log_dir)
        if args.log_dir
        else Path(tempfile.mkdtemp(prefix="pgquorum-bench-logs-"))
    )
    log_dir.mkdir(parents=True, exist_ok=True)
    pgpool_exe = find_program("pgpool") if "pgpool" in args.targets else None
    pgbouncer_exe = find_program("pgbouncer") if "pgbouncer" in args.targets else None
    host: dict[str, Any] = {
        "nproc": nproc(),
        "cpu": cpu_model(),
        "postgresql": pg_version(binaries),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
    run = Run(
        started=dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        host=host,
        settings={
            "clients": args.clients,
            "jobs": args.jobs,
            "duration": args.duration,
            "scale": args.scale,
            "router_workers": args.router_workers,
            "targets": list(args.targets),
        },
        log_dir=str(log_dir),
    )
    if "pgpool" in args.targets:
        if pgpool_exe:
            host["pgpool"] = pgpool_version(pgpool_exe)[0]
        else:
            run.notes.append(
                "pgpool column skipped: no `pgpool` binary installed (apt-get install pgpool2)"
            )
            console.print(f"[yellow]{run.notes[-1]}[/]")
    if "pgbouncer" in args.targets:
        if pgbouncer_exe:
            host["pgbouncer"] = pgbouncer_version(pgbouncer_exe)
        else:
            run.notes.append(
                "pgbouncer column skipped: no `pgbouncer` binary installed "
                "(apt-get install pgbouncer)"
            )
            console.print(f"[yellow]{run.notes[-1]}[/]")
    bench = Bench(args, binaries, log_dir)
    console.print(f"{header_line(run)}\nlogs: {log_dir}")

    data_dir = Path(tempfile.mkdtemp(prefix="pgquorum-bench-"))
    nodes: list[LocalNode] = []
    interrupted = False
    try:
        names = (["direct"] if {"direct", "relay", "pgbouncer"} & set(args.targets) else []) + (
            ["node1", "node2", "node3"]
            if {"router", "fanout", "pgpool"} & set(args.targets)
            else []
        )
        console.print(f"starting PostgreSQL {binaries.version} nodes: {', '.join(names)} ...")
        nodes = start_nodes(binaries, data_dir, names)
        by_name = {n.name: n for n in nodes}
        cluster = [n for n in nodes if n.name != "direct"]

        if "direct" in args.targets:
            node = by_name["direct"]
            node.psql("CREATE DATABASE bench_direct")
            run_target(run, bench, "direct", node.port, "bench_direct")
            drop_database([node], "bench_direct")

        if "pgbouncer" in args.targets and pgbouncer_exe:
            node = by_name["direct"]
            node.psql("CREATE DATABASE bench_pgbouncer")
            try:
                with pgbouncer(
                    pgbouncer_exe, node, "bench_pgbouncer", data_dir, log_dir, args.clients
                ) as port:
                    run_target(run, bench, "pgbouncer", port, "bench_pgbouncer")
            except RuntimeError as e:
                console.print(f"[red]pgbouncer target failed: {e}[/]")
                run.notes.append(f"pgbouncer: {str(e).splitlines()[0]}")
            drop_database([node], "bench_pgbouncer")

        if "relay" in args.targets:
            node = by_name["direct"]
            node.psql("CREATE DATABASE bench_relay")
            try:
                with ceiling("relay", [node], log_dir, args.router_workers) as port:
                    run_target(run, bench, "relay", port, "bench_relay")
            except RuntimeError as e:
                console.print(f"[red]relay target failed: {e}[/]")
                run.notes.append(f"relay: {str(e).splitlines()[0]}")
            drop_database([node], "bench_relay")

        if "router" in args.targets:
            try:
                with router(cluster, data_dir, log_dir, args.router_workers) as port:
                    ensure_database(run, binaries, port, cluster, "bench_router", "router")
                    run_target(run, bench, "router", port, "bench_router")
                check_consistency(run, cluster, "bench_router", "router")
            except RuntimeError as e:
                console.print(f"[red]router target failed: {e}[/]")
                run.notes.append(f"router: {str(e).splitlines()[0]}")
            drop_database(cluster, "bench_router")

        if "fanout" in args.targets:
            # It relays the simple protocol only: each node is set up directly (pgbench -i
            # writes the same rows everywhere), then TPC-B-like runs through it.
            for n in cluster:
                n.psql("CREATE DATABASE bench_fanout")
            inits = [bench.init(f"fanout-{n.name}", n.port, "bench_fanout") for n in cluster]
            tpcb = tuple(w for w in WORKLOADS if w.key == "tpcb")
            try:
                if not all(r.ok for r in inits):
                    raise RuntimeError("pgbench -i failed on a node (see the fanout-* logs)")
                with ceiling("fanout", cluster, log_dir, args.router_workers) as port:
                    run_target(run, bench, "fanout", port, "bench_fanout", tpcb)
                check_consistency(run, cluster, "bench_fanout", "fanout")
            except RuntimeError as e:
                console.print(f"[red]fanout target failed: {e}[/]")
                run.notes.append(f"fanout: {str(e).splitlines()[0]}")
            drop_database(cluster, "bench_fanout")

        if "pgpool" in args.targets and pgpool_exe:
            try:
                with pgpool(pgpool_exe, cluster, data_dir, log_dir, args.clients) as port:
                    ensure_database(run, binaries, port, cluster, "bench_pgpool", "pgpool")
                    run_target(run, bench, "pgpool", port, "bench_pgpool")
                check_consistency(run, cluster, "bench_pgpool", "pgpool")
            except RuntimeError as e:
                console.print(f"[red]pgpool target failed: {e}[/]")
                run.notes.append(f"pgpool: {str(e).splitlines()[0]}")
            drop_database(cluster, "bench_pgpool")
    except KeyboardInterrupt:
        interrupted = True
        console.print("[yellow]interrupted; stopping everything[/]")
    finally:
        for n in nodes:
            try:
                n.stop(mode="immediate" if interrupted else "fast")
            except Exception as e:  # keep stopping the others
                console.print(f"[red]could not stop {n.name}: {e}[/]")
                with contextlib.suppress(Exception):
                    n.kill()
        shutil.rmtree(data_dir, ignore_errors=True)

    if not run.results:
        return 130 if interrupted else 1
    if interrupted:
        run.notes.append("interrupted: results are incomplete")
    print_table(run)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(run), indent=2) + "\n")
        console.print(f"JSON written to {args.json}")
    if args.markdown:
        md = markdown(run)
        if args.markdown == "-":
            sys.stdout.write("\n" + md)
        else:
            Path(args.markdown).write_text(md)
            console.print(f"Markdown written to {args.markdown}")
    console.print(f"logs (pgbench, router, pgpool, pgbouncer): {log_dir}")
    failed = any(not r.ok for r in run.results)
    return 130 if interrupted else (1 if failed else 0)


if __name__ == "__main__":
    sys.exit(main())
