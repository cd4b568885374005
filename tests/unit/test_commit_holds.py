"""The commit coordinator's holds (router/commit.py): commit slots, the barrier and quiet
holds, as asyncio primitives (no PostgreSQL needed: nothing here talks to a node)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from pgquorum.cluster.store import StateStore
from pgquorum.router import commit
from pgquorum.router.commit import CommitCoordinator


def coordinator() -> CommitCoordinator:
    router = SimpleNamespace(settings=SimpleNamespace(name="r"), store=StateStore(None))
    return CommitCoordinator(router)  # type: ignore[arg-type]


async def committing(commits: CommitCoordinator, seen: list[str], name: str, s: float) -> None:
    async with commits.commit_slot():
        seen.append(f"{name} in")
        await asyncio.sleep(s)
        seen.append(f"{name} out")


def test_a_quiet_hold_waits_for_commits_in_flight_and_holds_new_ones() -> None:
    async def go() -> list[str]:
        commits = coordinator()
        seen: list[str] = []
        first = asyncio.create_task(committing(commits, seen, "c1", 0.05))
        await asyncio.sleep(0.01)
        async with commits.quiet(5.0) as hold:
            assert hold.kept
            seen.append("quiet")
            second = asyncio.create_task(committing(commits, seen, "c2", 0))
            await asyncio.sleep(0.01)  # (under QUIET_PATIENCE_S: c2 waits)
            seen.append("quiet over")
        await asyncio.gather(first, second)
        return seen

    assert asyncio.run(go()) == ["c1 in", "c1 out", "quiet", "quiet over", "c2 in", "c2 out"]


def test_a_commit_that_waits_too_long_ends_the_holds() -> None:
    """The held statement may wait for a lock of the transaction that wants to commit."""

    async def go() -> tuple[list[str], bool, bool]:
        commits = coordinator()
        seen: list[str] = []
        async with commits.quiet(5.0) as hold:
            task = asyncio.create_task(committing(commits, seen, "c", 0))
            await asyncio.sleep(commit.QUIET_PATIENCE_S * 5)
            seen.append("statement done")
            await task
        return seen, not commits._holds, hold.kept

    seen, released, kept = asyncio.run(go())
    assert seen == ["c in", "c out", "statement done"]
    assert released
    assert not kept  # (its owner learns that commits went on meanwhile)


def test_holds_may_overlap_but_do_not_starve_a_waiting_commit() -> None:
    async def go() -> list[str]:
        commits = coordinator()
        seen: list[str] = []

        async def hold(name: str, s: float) -> None:
            async with commits.quiet(5.0):
                seen.append(f"{name} in")
                await asyncio.sleep(s)
                seen.append(f"{name} out")

        h1 = asyncio.create_task(hold("h1", 0.01))
        h2 = asyncio.create_task(hold("h2", 0.01))  # inside together with h1
        await asyncio.sleep(0.001)
        c = asyncio.create_task(committing(commits, seen, "c", 0.005))
        await asyncio.sleep(0.001)
        h3 = asyncio.create_task(hold("h3", 0))  # the commit waits: h3 comes after it
        await asyncio.gather(h1, h2, c, h3)
        return seen

    seen = asyncio.run(go())
    assert seen[:2] == ["h1 in", "h2 in"]
    assert seen.index("c in") > max(seen.index("h1 out"), seen.index("h2 out"))
    assert seen.index("h3 in") > seen.index("c out")


def test_a_hold_gives_up_when_a_commit_in_flight_does_not_end() -> None:
    async def go() -> bool:
        commits = coordinator()
        seen: list[str] = []
        stuck = asyncio.create_task(committing(commits, seen, "stuck", 0.2))
        await asyncio.sleep(0.01)
        async with commits.quiet(0.05) as hold:
            pass
        await stuck
        return hold.kept

    assert asyncio.run(go()) is False


def test_a_hold_is_early_only_if_it_ended_and_a_commit_landed_before_the_others_ran() -> None:
    """Hold.early decides whether a held statement must fail (40001) whatever the nodes
    answered: its hold ended before the nodes after the lead got it, and a commit may have
    landed in between."""

    async def go() -> tuple[bool, bool, bool]:
        commits = coordinator()
        async with commits.quiet(5.0) as kept:
            kept.reach_others()
        async with commits.quiet(0.01) as lapsed:  # ran out of time, no commit meanwhile
            await asyncio.sleep(0.03)
            lapsed.reach_others()
        assert not lapsed.kept
        async with commits.quiet(5.0) as overtaken:
            task = asyncio.create_task(committing(commits, [], "c", 0))
            await asyncio.sleep(commit.QUIET_PATIENCE_S * 5)  # the commit ends the hold
            overtaken.reach_others()
            await task
        return kept.early, lapsed.early, overtaken.early

    assert asyncio.run(go()) == (False, False, True)
