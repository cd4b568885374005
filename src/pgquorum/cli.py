"""The `pgquorum` command. Thin: it parses arguments and calls the library."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import uvloop
from rich.console import Console
from rich.live import Live
from rich.table import Table

from pgquorum.config import ConfigError, load_config

if TYPE_CHECKING:
    from rich.progress import Progress

    from pgquorum.router.client import Link

console = Console()
T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(coro)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _cluster_dir(text: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """--dir: a local cluster's directory (pgquorum up, down, recover)."""
    return click.option(
        "--dir",
        "directory",
        default=".pgquorum",
        show_default=True,
        type=click.Path(path_type=Path),
        help=text,
    )


@click.group()
@click.version_option(package_name="pgquorum")
def main() -> None:
    """pgquorum: several PostgreSQL servers acting as one fault-tolerant database."""


@main.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path),
    help="TOML file describing the listen address, nodes, users file, read_policy.",
)
@click.option("-v", "--verbose", is_flag=True)
@click.option("--worker", type=int, default=None, hidden=True)
def router(config_path: Path, verbose: bool, worker: int | None) -> None:
    """Run a router in front of existing PostgreSQL servers."""
    from pgquorum.router.workers import Supervisor, worker_config

    parent = os.getppid()  # a worker's first process (see _wait_for_signal)
    try:
        config = load_config(config_path)
        workers = config.router.workers
        if workers > 1:
            config = worker_config(config, worker or 0)
    except ConfigError as e:
        console.print(f"{config_path}: invalid configuration", style="red", markup=False)
        for p in e.problems:
            console.print(f"  - {p}", markup=False)
        sys.exit(2)
    _setup_logging(verbose)

    async def serve() -> None:
        from pgquorum.router.server import Router

        supervisor = None
        if workers > 1:
            # This process is worker 0 and starts the others (router/workers.py).
            supervisor = Supervisor(config_path, workers, verbose) if worker is None else None
        r = Router(config)
        await r.start()
        if supervisor is not None:
            supervisor.start()
        await _wait_for_signal(orphan_of=parent if worker is not None else None)
        if supervisor is not None:
            await supervisor.stop()
        await r.stop()

    _run(serve())


async def _wait_for_signal(*, orphan_of: int | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if orphan_of is not None:
        # A worker whose first process died (even by SIGKILL, even while this one was
        # still starting: the parent is taken at process start) stops too, rather than
        # serving on alone without its supervisor.

        async def watch_parent() -> None:
            while os.getppid() == orphan_of:
                await asyncio.sleep(1)
            stop.set()

        watcher = loop.create_task(watch_parent())
    await stop.wait()
    if orphan_of is not None:
        watcher.cancel()


@main.command()
@click.option(
    "--nodes",
    default=3,
    show_default=True,
    type=click.IntRange(1, 16),
    help="Number of PostgreSQL servers in the group.",
)
@click.option(
    "--port",
    default=6432,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port of the router on 127.0.0.1.",
)
@_cluster_dir("Directory for the data directories.")
@click.option(
    "--password",
    envvar="PGQUORUM_PASSWORD",
    default=None,
    help="Require SCRAM passwords: the postgres user's password (set when the "
    "cluster is created). Also read from PGQUORUM_PASSWORD.",
)
@click.option("-v", "--verbose", is_flag=True)
def up(nodes: int, port: int, directory: Path, password: str | None, verbose: bool) -> None:
    """Create (first run) or reuse a local cluster and run it until Ctrl-C or SIGTERM."""
    from pgquorum.local.binaries import PostgresNotFound
    from pgquorum.local.cluster import LocalCluster

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    cluster = LocalCluster(directory, nodes, port, password)
    # SIGTERM while servers are being started must still stop them: turn it into the same
    # KeyboardInterrupt as Ctrl-C until the event loop installs its own handlers.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with console.status("preparing PostgreSQL data directories"):
            cluster.prepare()
        with console.status(f"starting {len(cluster.nodes)} PostgreSQL servers"):
            cluster.start_nodes()
    except PostgresNotFound as e:
        console.print(str(e), style="red", markup=False)
        sys.exit(1)
    except (Exception, KeyboardInterrupt) as e:
        if not isinstance(e, KeyboardInterrupt):
            console.print(f"could not start the local cluster: {e}", style="red", markup=False)
        cluster.stop_nodes()
        sys.exit(1)

    async def serve() -> None:
        from pgquorum.router.server import Router

        cluster.mark_joining()
        r = Router(cluster.router_config())
        await r.start()
        cluster.write_state(router_pid=os.getpid())
        joining = asyncio.ensure_future(_join(r, cluster.joining))
        auth = f" password={password}" if password else ""
        console.print(f"pgquorum is up: {len(cluster.nodes)} nodes behind 127.0.0.1:{port}")
        console.print(f'  psql "host=127.0.0.1 port={port} user=postgres dbname=postgres{auth}"')
        console.print(f"  admin console: psql -h 127.0.0.1 -p {port} -U postgres pgquorum")
        console.print("  Ctrl-C stops everything")
        waiter = asyncio.ensure_future(_wait_for_signal())
        with Live(_status_line(r), console=console, refresh_per_second=1, transient=True) as live:
            while not waiter.done():
                await asyncio.wait([waiter], timeout=1)
                live.update(_status_line(r))
        joining.cancel()
        await r.stop()

    try:
        _run(serve())
    except KeyboardInterrupt:
        pass  # a signal before the loop's own handlers were installed: stop the same way
    finally:
        with console.status("stopping PostgreSQL servers"):
            cluster.stop_nodes()
        cluster.write_state(router_pid=None)
        console.print("pgquorum stopped")


async def _join(r: object, names: list[str]) -> None:
    """Recover the nodes added to a local cluster, one after the other."""
    from pgquorum.router.server import Router

    assert isinstance(r, Router)
    for name in names:
        console.print(f"  {name} is new: it joins the group by recovery")
        running = r.recovery
        if running is not None and running.task is not None and running.running:
            await asyncio.wait({running.task})  # one recovery at a time
        recovery = r.start_recovery(name)
        assert recovery.task is not None
        await recovery.task
        p = recovery.progress
        console.print(f"  {name}: recovery {p.phase} {p.error}".rstrip(), markup=False)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _status_line(r: object) -> str:
    from pgquorum.router.server import Router

    assert isinstance(r, Router)
    parts = []
    lead = r.cluster.lead()
    for st in r.cluster.status.values():
        role = "*" if st is lead else ""
        parts.append(f"{st.node.name}{role} {st.state.value} {st.statements}")
    return f"sessions {len(r.sessions)} | " + " | ".join(parts)


@main.command()
@_cluster_dir("The local cluster's directory.")
def down(directory: Path) -> None:
    """Stop a local cluster left running."""
    from pgquorum.local.cluster import stop_left_running

    done = stop_left_running(directory)
    console.print("\n".join(done) if done else "nothing was running")


def _router_address(f: Callable[..., None]) -> Callable[..., None]:
    """--host/--port/--user/--password of a router's admin console."""
    f = click.option("--password", envvar="PGQUORUM_PASSWORD", default=None)(f)
    f = click.option("--user", default="postgres", show_default=True)(f)
    f = click.option("--port", default=6432, show_default=True, type=int)(f)
    return click.option("--host", default="127.0.0.1", show_default=True)(f)


@main.command()
@_router_address
def status(host: str, port: int, user: str, password: str | None) -> None:
    """Print the router's SHOW NODES table."""
    from pgquorum.router.client import admin_query

    try:
        cols, rows = _run_value(admin_query(host, port, user, password, "SHOW NODES"))
    except Exception as e:
        console.print(f"cannot reach the router at {host}:{port}: {e}", style="red", markup=False)
        sys.exit(1)
    _print_table(cols, rows)


@main.command()
@_router_address
@click.option("--fail-minority", is_flag=True, help="Fail the nodes that differ from the majority.")
def verify(host: str, port: int, user: str, password: str | None, fail_minority: bool) -> None:
    """Compare the router's ONLINE nodes at one consistent point; exit 1 if any differ."""
    from pgquorum.router.client import admin_query

    command = "VERIFY FAIL MINORITY" if fail_minority else "VERIFY"
    try:
        cols, rows = _run_value(admin_query(host, port, user, password, command, timeout=3600))
    except Exception as e:
        console.print(f"verify failed at {host}:{port}: {e}", style="red", markup=False)
        sys.exit(2)
    if not rows:
        console.print("every ONLINE node holds the same data")
        return
    _print_table(cols, rows, title="differences from the majority")
    sys.exit(1)


@main.command()
@click.argument("node")
@_router_address
@_cluster_dir("A local cluster (pgquorum up): a node whose server is down is started first.")
def recover(
    node: str, host: str, port: int, user: str, password: str | None, directory: Path
) -> None:
    """Bring a FAILED node back while clients go on: rebuilt from a snapshot of a healthy
    node, then the transactions committed meanwhile replayed. Exit 1 if it fails."""
    from pgquorum.local.cluster import start_if_down
    from pgquorum.sql.quoting import quote_ident

    if start_if_down(directory, node):
        console.print(f"started the server of {node}")
    _recover((host, port, user, password), node, f"RECOVER NODE {quote_ident(node)}")


@main.command("add-node")
@click.argument("node")
@click.argument("address")
@_router_address
def add_node(
    node: str, address: str, host: str, port: int, user: str, password: str | None
) -> None:
    """Join an empty PostgreSQL server at ADDRESS (host:port, or a socket directory:port) to
    the group as NODE, filled the way a recovery fills a node. Exit 1 if it fails."""
    node_host, _, node_port = address.rpartition(":")
    if not node_host or not node_port.isdigit():
        raise click.BadParameter("expected HOST:PORT", param_hint="ADDRESS")
    from pgquorum.router.client import console_literal
    from pgquorum.sql.quoting import quote_ident

    command = f"ADD NODE {quote_ident(node)} {console_literal(node_host)} {int(node_port)}"
    _recover((host, port, user, password), node, command)


@main.command("remove-node")
@click.argument("node")
@_router_address
def remove_node(node: str, host: str, port: int, user: str, password: str | None) -> None:
    """Take NODE out of the group for good (on every peer router too)."""
    from pgquorum.router.client import admin_query
    from pgquorum.sql.quoting import quote_ident

    command = f"REMOVE NODE {quote_ident(node)}"
    try:
        _run_value(admin_query(host, port, user, password, command))
    except Exception as e:
        console.print(f"cannot remove {node}: {e}", style="red", markup=False)
        sys.exit(1)
    console.print(f"{node} is no longer part of the group")


def _recover(router: tuple[str, int, str, str | None], node: str, command: str) -> None:
    """Start a recovery with ``command`` and follow it to its end."""
    host, port, user, password = router
    try:
        info = _run_value(_start_and_follow(host, port, user, password, command))
    except Exception as e:
        console.print(f"recovery of {node} failed: {e}", style="red", markup=False)
        sys.exit(1)
    if info.get("phase") != "done":
        console.print(f"recovery of {node} failed: {info.get('error')}", style="red", markup=False)
        sys.exit(1)
    console.print(
        f"{node} is ONLINE: {info['bytes']} bytes restored, {info['replayed']} transactions "
        f"replayed in {info['seconds']} s; longest pause {info['longest_pause_ms']} ms",
        markup=False,
    )


async def _start_and_follow(
    host: str, port: int, user: str, password: str | None, command: str
) -> dict[str, str]:
    """Start a recovery with ``command``, then poll SHOW RECOVERY on the same admin
    connection, drawing a progress bar, until the recovery ends."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

    from pgquorum.router.client import admin_link

    columns = (
        SpinnerColumn(),
        TextColumn("{task.fields[phase]:<8}"),
        BarColumn(),
        TextColumn("databases {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("{task.fields[size]}"),
        TextColumn("queue {task.fields[depth]}"),
    )
    link = await admin_link(host, port, user, password)
    try:
        await link.query(command)
        with Progress(*columns, console=console, transient=True) as bar:
            return await _follow(link, bar)
    finally:
        link.close()


async def _follow(link: Link, bar: Progress) -> dict[str, str]:
    """SHOW RECOVERY five times a second, drawn on ``bar``, until the recovery ends."""
    task = bar.add_task("recovery", total=1, phase="starting", size="", depth="0")
    while True:
        cols, rows = await link.query("SHOW RECOVERY")
        info = {c: v or "" for c, v in zip(cols, rows[0], strict=True)} if rows else {}
        done_dbs, _, dbs = info.get("databases", "0/0").partition("/")
        bar.update(
            task,
            total=max(int(dbs or 0), 1),
            completed=int(done_dbs or 0),
            phase=info.get("phase", ""),
            size=f"{int(info.get('bytes') or 0) / 1e6:.1f} MB",
            depth=f"{info.get('queue_depth') or 0} "
            f"({int(info.get('queue_bytes') or 0) / 1e6:.1f} MB)",
        )
        if info.get("phase") in ("done", "failed"):
            return info
        await asyncio.sleep(0.2)


def _print_table(cols: list[str], rows: list[list[str | None]], title: str | None = None) -> None:
    table = Table(*cols, title=title)
    for row in rows:
        table.add_row(*(v or "" for v in row))
    # Piped output has no terminal width to fit: do not cut the cells short.
    (console if console.is_terminal else Console(width=240)).print(table)


def _run_value(coro: Coroutine[Any, Any, T]) -> T:
    result: list[T] = []

    async def wrap() -> None:
        result.append(await coro)

    _run(wrap())
    return result[0]


if __name__ == "__main__":
    main()
