"""asyncpg through the router: its binary protocol, prepared statements, COPY and pipelines."""

from __future__ import annotations

import asyncio

import asyncpg
from router_harness import RouterThread


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_asyncpg_roundtrip(router: RouterThread, db: str) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(router.url(db))
        try:
            await conn.execute("CREATE TABLE a (id int PRIMARY KEY, name text, at timestamptz)")
            await conn.executemany(
                "INSERT INTO a (id, name) VALUES ($1, $2)", [(i, f"name{i}") for i in range(200)]
            )
            stmt = await conn.prepare("SELECT name FROM a WHERE id = $1")
            for i in (0, 50, 199):
                assert await stmt.fetchval(i) == f"name{i}"
            rows = await conn.fetch("SELECT id, name FROM a WHERE id < $1 ORDER BY id", 3)
            assert [tuple(r) for r in rows] == [(0, "name0"), (1, "name1"), (2, "name2")]
            async with conn.transaction():
                await conn.execute("UPDATE a SET name = 'x' WHERE id = $1", 1)
                assert await conn.fetchval("SELECT name FROM a WHERE id = 1") == "x"
            await conn.copy_records_to_table(
                "a", records=[(1000 + i, "copied", None) for i in range(500)]
            )
            assert await conn.fetchval("SELECT count(*) FROM a") == 700
            # Binary types through the router.
            val = await conn.fetchval("SELECT $1::numeric * 2", 21)
            assert int(val) == 42
            async with conn.transaction():
                cur = await conn.cursor("SELECT id FROM a ORDER BY id")
                first = await cur.fetch(5)
                assert [r[0] for r in first] == [0, 1, 2, 3, 4]
        finally:
            await conn.close()

    run(main())


def test_asyncpg_pool_concurrency(router: RouterThread, db: str) -> None:
    async def main() -> None:
        pool = await asyncpg.create_pool(router.url(db), min_size=4, max_size=8)
        assert pool is not None
        try:
            await pool.execute("CREATE TABLE counter (id int PRIMARY KEY, n int)")
            await pool.execute("INSERT INTO counter VALUES (1, 0)")

            async def bump() -> None:
                async with pool.acquire() as c, c.transaction():
                    await c.execute("UPDATE counter SET n = n + 1 WHERE id = 1")

            await asyncio.gather(*(bump() for _ in range(100)))
            assert await pool.fetchval("SELECT n FROM counter WHERE id = 1") == 100
        finally:
            await pool.close()

    run(main())


def test_asyncpg_executemany_gives_each_row_its_serial(router: RouterThread, db: str) -> None:
    """executemany sends Bind/Execute pairs of one statement before a single Sync: each
    execution gets its own sequence values, as on one server (the db fixture then compares
    the nodes)."""

    async def main() -> None:
        conn = await asyncpg.connect(router.url(db))
        try:
            await conn.execute("CREATE TABLE s (id serial PRIMARY KEY, name text)")
            await conn.executemany("INSERT INTO s (name) VALUES ($1)", [(n,) for n in "abcde"])
            rows = await conn.fetch("SELECT id, name FROM s ORDER BY id")
            assert [tuple(r) for r in rows] == list(zip(range(1, 6), "abcde", strict=True))
        finally:
            await conn.close()

    run(main())
