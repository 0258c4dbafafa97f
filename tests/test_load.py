"""The load run checks what it claims: `TurnChecker` counts each kind of lost, duplicated or stray
event exactly, holds nothing once turns complete, and a short real run passes every check.
Functional only: no time or memory figure is judged here."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import moa_stream
from benchmarks import load
from benchmarks.load import PROBLEMS, TurnChecker, question
from moa_stream import CallOutput, CallRecord, CallUsage, TurnEnd, TurnTrace

CALLS = 4
"""Calls of a synthetic turn, like a MoA turn of three references and an aggregator."""

_ids = (f"{n:032x}" for n in itertools.count(1))


def usage(turn_id: str, call_id: str) -> CallUsage:
    return CallUsage(
        call_id=call_id,
        turn_id=turn_id,
        session_id="s",
        role="reference",
        label="ref",
        model="ref",
        provider="sim",
        started_at=0.0,
        duration_s=0.0,
        status="completed",
    )


def end(turn_id: str, calls: int = CALLS) -> TurnEnd:
    return TurnEnd(
        turn_id=turn_id,
        session_id="s",
        model="moa:load",
        calls=calls,
        failed_calls=0,
        input_tokens=0,
        cached_input_tokens=0,
        output_tokens=0,
        reasoning_tokens=0,
        usage_complete=True,
        cost_usd=0.0,
        cost_complete=True,
        started_at=0.0,
        duration_s=0.0,
        status="completed",
    )


def trace(turn_id: str, call_ids: list[str], content: str, turn_end: TurnEnd) -> TurnTrace:
    records = [
        CallRecord(
            call_id=call_id,
            role="reference",
            label="ref",
            model="ref",
            provider="sim",
            input_messages=[{"role": "user", "content": content}],
            output=CallOutput(),
            output_source="inline",
            usage=usage(turn_id, call_id),
        )
        for call_id in call_ids
    ]
    return TurnTrace(turn_id=turn_id, session_id="s", model="moa:load", calls=records, end=turn_end)


class Turn:
    """The events of one clean synthetic turn, as the library emits them, to feed in any order."""

    def __init__(self, number: int) -> None:
        self.turn_id = next(_ids)
        self.call_ids = [next(_ids) for _ in range(CALLS)]
        self.usages = [usage(self.turn_id, call_id) for call_id in self.call_ids]
        self.end = end(self.turn_id)
        self.trace = trace(self.turn_id, self.call_ids, question(number), self.end)

    def events(self) -> list[moa_stream.Event]:
        return [*self.usages, self.end, self.trace]


def started_turn(checker: TurnChecker) -> Turn:
    return Turn(checker.start())


def feed(checker: TurnChecker, events: list[moa_stream.Event]) -> None:
    for event in events:
        checker(event)


def problems(checker: TurnChecker, **expected: int) -> None:
    """Assert the problems counted are exactly `expected` (names with `_` for spaces), others zero."""
    wanted = {name: expected.pop(name.replace(" ", "_"), 0) for name in PROBLEMS}
    assert not expected, f"not problem names: {sorted(expected)}"
    assert checker.finish()["problems"] == wanted


def verdict_checks(checker: TurnChecker, *, turns: int, sink_dropped: int = 0) -> dict[str, bool]:
    return load.checks(checker.finish(), upstream_requests=turns * CALLS, sink_dropped=sink_dropped, sink_failed=0)


# -- one turn ---------------------------------------------------------------------------------------


def test_a_clean_turn_completes_and_passes_every_check() -> None:
    checker = TurnChecker()
    feed(checker, started_turn(checker).events())
    verdict = checker.finish()
    assert (verdict["turns_started"], verdict["turns_completed"], verdict["turn_ids_left"]) == (1, 1, 0)
    problems(checker)
    assert all(verdict_checks(checker, turns=1).values())


def test_a_duplicated_turn_end_is_counted_once() -> None:
    checker = TurnChecker()
    turn = started_turn(checker)
    feed(checker, [*turn.usages, turn.end, turn.end, turn.trace])
    problems(checker, duplicated_TurnEnd=1)
    assert not verdict_checks(checker, turns=1)[
        "every started turn completed once: one TurnEnd, one TurnTrace, a CallUsage per call"
    ]


def test_a_duplicated_turn_trace_is_counted_once() -> None:
    checker = TurnChecker()
    turn = started_turn(checker)
    feed(checker, [*turn.usages, turn.trace, turn.trace, turn.end])
    problems(checker, duplicated_TurnTrace=1)
    assert checker.finish()["turns_completed"] == 1


def test_a_call_id_reported_twice_in_its_turn_is_a_reused_call_id() -> None:
    checker = TurnChecker()
    turn = started_turn(checker)
    feed(checker, [*turn.usages, turn.usages[1], turn.end, turn.trace])
    problems(checker, reused_call_id=1)
    failed = [name for name, ok in verdict_checks(checker, turns=1).items() if not ok]
    assert failed == [
        "every CallUsage a distinct call id that its turn's trace lists",
        "one CallUsage per upstream request",
    ]


def test_a_trace_listing_a_call_twice_is_a_reused_call_id() -> None:
    checker = TurnChecker()
    number = checker.start()
    turn_id, call_ids = next(_ids), [next(_ids) for _ in range(CALLS - 1)]
    listed = [*call_ids, call_ids[0]]
    feed(
        checker,
        [*(usage(turn_id, c) for c in call_ids), end(turn_id), trace(turn_id, listed, question(number), end(turn_id))],
    )
    problems(checker, reused_call_id=1)


def test_a_missing_call_usage_leaves_its_turn_open() -> None:
    checker = TurnChecker()
    turn = started_turn(checker)
    feed(checker, [*turn.usages[:-1], turn.end, turn.trace])
    problems(checker)  # nothing wrong arrived: something never did
    verdict = checker.finish()
    assert (verdict["turns_completed"], verdict["turn_ids_left"], verdict["call_usage_missing"]) == (0, 1, 1)
    checks = verdict_checks(checker, turns=1)
    assert not checks["nothing left after the drain"]
    assert not checks["one CallUsage per upstream request"]


def test_a_call_usage_its_trace_does_not_list_is_counted_before_or_after_the_trace() -> None:
    checker = TurnChecker()
    before, after = started_turn(checker), started_turn(checker)
    feed(checker, [usage(before.turn_id, next(_ids)), *before.events()])
    feed(checker, [after.trace, usage(after.turn_id, next(_ids)), *after.usages, after.end])
    problems(checker, CallUsage_not_in_its_trace=2)
    assert checker.finish()["turns_completed"] == 2


def test_a_trace_naming_no_started_turn_is_an_unknown_turn() -> None:
    checker = TurnChecker()
    feed(checker, Turn(0).events())  # never started
    turn = started_turn(checker)
    feed(checker, [*turn.usages, turn.end, trace(turn.turn_id, turn.call_ids, "something else", turn.end)])
    problems(checker, unknown_turn=2)
    verdict = checker.finish()
    assert (verdict["turns_completed"], verdict["turns_unnamed"], verdict["turn_ids_left"]) == (0, 1, 2)


def test_two_turn_ids_naming_one_turn_is_a_turn_traced_twice() -> None:
    checker = TurnChecker()
    number = checker.start()
    first, second = Turn(number), Turn(number)
    feed(checker, [*first.events(), *second.events()])
    problems(checker, turn_traced_twice=1)
    assert checker.finish()["turn_ids_left"] == 1


def test_turn_end_and_trace_that_count_other_calls_disagree_whichever_comes_first() -> None:
    checker = TurnChecker()
    end_first, trace_first = started_turn(checker), started_turn(checker)
    feed(checker, [*end_first.usages, end(end_first.turn_id, calls=CALLS - 1), end_first.trace])
    feed(checker, [*trace_first.usages, trace_first.trace, end(trace_first.turn_id, calls=CALLS - 1)])
    problems(checker, TurnEnd_and_TurnTrace_disagree=2)


def test_a_trace_whose_end_counts_other_calls_than_it_lists_disagrees() -> None:
    checker = TurnChecker()
    number = checker.start()
    turn_id, call_ids = next(_ids), [next(_ids) for _ in range(CALLS)]
    short = end(turn_id, calls=CALLS - 1)
    feed(checker, [trace(turn_id, call_ids, question(number), short), short, *(usage(turn_id, c) for c in call_ids)])
    problems(checker, TurnEnd_and_TurnTrace_disagree=1)
    assert checker.finish()["turns_completed"] == 1


def test_events_after_their_turn_completed_are_left_over() -> None:
    checker = TurnChecker()
    turn = started_turn(checker)
    feed(checker, [*turn.events(), turn.end, turn.usages[0]])
    problems(checker)  # the turn was gone: the strays open an entry that can never complete
    verdict = checker.finish()
    assert (verdict["turns_completed"], verdict["turn_ids_left"], verdict["without_trace"]) == (1, 1, 1)
    assert not verdict_checks(checker, turns=1)["nothing left after the drain"]


def test_a_late_trace_of_a_completed_turn_is_a_turn_traced_twice() -> None:
    checker = TurnChecker()
    turn = started_turn(checker)
    feed(checker, [*turn.events(), turn.trace])
    problems(checker, turn_traced_twice=1)


def test_events_in_any_order_and_interleaved_complete_their_turns() -> None:
    checker = TurnChecker()
    first, second = started_turn(checker), started_turn(checker)
    feed(checker, [second.trace, first.end, *reversed(second.usages), first.usages[0], second.end])
    feed(checker, [first.trace, *first.usages[1:]])
    problems(checker)
    assert checker.finish()["turns_completed"] == 2
    assert all(verdict_checks(checker, turns=2).values())


def test_a_started_turn_without_events_fails_the_checks() -> None:
    checker = TurnChecker()
    feed(checker, started_turn(checker).events())
    checker.start()
    verdict = checker.finish()
    assert (verdict["turns_started"], verdict["turns_completed"], verdict["turns_unnamed"]) == (2, 1, 1)
    assert not verdict_checks(checker, turns=1)["nothing left after the drain"]


def test_events_a_sink_dropped_fail_the_checks() -> None:
    checker = TurnChecker()
    feed(checker, started_turn(checker).events())
    assert not verdict_checks(checker, turns=1, sink_dropped=1)["no event dropped or failed by a sink"]


# -- bounded bookkeeping ----------------------------------------------------------------------------


def sliding_window(checker: TurnChecker, turns: int, window: int) -> Iterator[dict[str, int]]:
    """Run `turns` synthetic turns with `window` started and not complete at a time, events of the
    oldest first, each turn's in a scrambled order; yield the checker's snapshot after each turn."""
    open_turns = [started_turn(checker) for _ in range(window)]
    for index in range(turns):
        turn = open_turns.pop(0)
        events = turn.events()
        feed(checker, events[index % len(events) :] + events[: index % len(events)])
        if index + window < turns:
            open_turns.append(started_turn(checker))
        yield checker.snapshot()


def test_bookkeeping_is_bounded_by_the_turns_open_and_empties_when_they_complete() -> None:
    checker = TurnChecker()
    window = 50
    snapshots = list(sliding_window(checker, 10_000, window))
    assert max(s["held"] for s in snapshots) <= window
    # A turn whose events are arriving is held twice at most: by number and by turn id.
    assert checker.max_held <= window + 1
    assert snapshots[-1] == {
        "started": 10_000,
        "completed": 10_000,
        "open": 0,
        "turn_ids": 0,
        "unnamed": 0,
        "held": 0,
        "call_ids": 0,
    }
    problems(checker)


# -- a real run -------------------------------------------------------------------------------------


async def test_a_short_run_with_faults_passes_every_check() -> None:
    result = await load.run(seconds=2, turns=8, fault_rate=0.2, round_seconds=1)
    assert [name for name, ok in result["checks"].items() if not ok] == []
    assert len(result["checks"]) == 5
    verdict = result["checker"]
    assert verdict["turns_completed"] == verdict["turns_started"] >= 8
    assert result["faults_injected"] > 0
    assert result["upstream_requests"] == verdict["events"]["CallUsage"]
    assert len(result["rounds"]) == 2
    assert {"rss_mib", "objects", "blocks", "held"} <= result["rounds"][-1].keys()
    assert result["growth"] is not None
    assert any(line.startswith("growth from the first round to the last") for line in load.summary(result))
    json.dumps(result)  # what --json writes
