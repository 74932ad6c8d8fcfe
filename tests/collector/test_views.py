"""Shared views of big tables: computed once, kept fresh by the analysis pass while someone reads them,
dropped when no one does; small tables always computed afresh."""

from __future__ import annotations

from collector.views import BIG_ROWS, Views


def counter() -> tuple[list[int], object]:
    calls: list[int] = []

    def compute() -> int:
        calls.append(1)
        return len(calls)

    return calls, compute


def test_a_view_read_between_passes_is_computed_once_and_each_pass_refreshes_it():
    views = Views(max_age_s=60.0)
    calls, compute = counter()
    assert views.get("v", compute, rows=BIG_ROWS) == 1
    assert views.get("v", compute, rows=BIG_ROWS) == 1 and len(calls) == 1  # read, not recomputed
    views.refresh()  # the analysis pass: what a request reads next is as of this pass
    assert len(calls) == 2 and views.get("v", compute, rows=BIG_ROWS) == 2 and len(calls) == 2


def test_a_view_no_one_reads_is_dropped_and_a_small_table_is_always_computed():
    views = Views(max_age_s=60.0, keep_s=0.0)
    calls, compute = counter()
    views.get("v", compute, rows=BIG_ROWS)
    views.refresh()  # not read since: dropped, not recomputed
    assert len(calls) == 1
    assert views.get("v", compute, rows=BIG_ROWS) == 2  # computed again on demand
    small_calls, small = counter()
    views.get("s", small, rows=BIG_ROWS - 1)
    views.get("s", small, rows=BIG_ROWS - 1)
    assert len(small_calls) == 2


def test_a_stale_view_is_computed_by_the_request_and_one_that_fails_to_refresh_is_dropped():
    views = Views(max_age_s=0.0)  # no pass ran within two intervals: the request computes
    calls, compute = counter()
    views.get("v", compute)
    assert views.get("v", compute) == 2
    views = Views(max_age_s=60.0)
    state = {"fail": False}

    def flaky() -> str:
        if state["fail"]:
            raise KeyError("gone")
        return "ok"

    assert views.get("f", flaky) == "ok"
    state["fail"] = True
    views.refresh()  # the failure is not raised in the analysis pass
    state["fail"] = False
    assert views.get("f", flaky) == "ok"


def test_views_are_bounded_in_number_the_least_recently_read_going_first():
    from collector.views import MAX_VIEWS

    views = Views(max_age_s=60.0)
    for i in range(MAX_VIEWS):
        views.get(i, lambda i=i: i)
    views.get(0, lambda: -1)  # read again: the most recent now
    views.get("new", lambda: "n")  # one too many: view 1, read longest ago, goes
    assert views.get(0, lambda: -1) == 0 and views.get("new", lambda: "x") == "n"
    assert views.get(1, lambda: "recomputed") == "recomputed"
