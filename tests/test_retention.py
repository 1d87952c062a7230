"""Retention policy for ``casfs prune`` (borg prune semantics), on fixed UTC timestamps.

Every expected result is written out by hand: the exact set of kept snapshots and the one
reason each was kept for. Snapshot names carry their own creation time, ``s-2024-01-30T11:00``.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from casfs.errors import CasfsError
from casfs.workflows.retention import Decision, Policy, plan


def ns(stamp: str, tz: timezone = UTC) -> int:
    """``"2024-01-30T11:00"`` in ``tz`` as nanoseconds since the epoch."""
    return int(datetime.fromisoformat(stamp).replace(tzinfo=tz).timestamp()) * 1_000_000_000


def snap(stamp: str, prefix: str = "s-") -> tuple[bytes, int]:
    return f"{prefix}{stamp}".encode(), ns(stamp)


def daily(first: str, last: str, at: str) -> list[tuple[bytes, int]]:
    """One snapshot a day at ``at`` (HH:MM), from ``first`` to ``last`` inclusive."""
    day, end = date.fromisoformat(first), date.fromisoformat(last)
    out = []
    while day <= end:
        out.append(snap(f"{day.isoformat()}T{at}"))
        day += timedelta(days=1)
    return out


EXTRA_HOURLY = [snap("2024-01-30T09:00"), snap("2024-01-30T10:00"), snap("2024-01-30T11:00")]
DATASETS: dict[str, list[tuple[bytes, int]]] = {
    # 2024-01-01 is a Monday: ISO weeks 1-4 are Jan 1-7, 8-14, 15-21, 22-28; Jan 29-30 is week 5.
    "jan": daily("2024-01-01", "2024-01-30", "03:00") + EXTRA_HOURLY,
    "long": daily("2023-06-01", "2024-01-30", "03:00") + EXTRA_HOURLY,
    # ISO 2020-W53 runs Mon 2020-12-28 to Sun 2021-01-03; 2021-W01 starts Mon 2021-01-04.
    "yearend": daily("2020-12-20", "2021-01-12", "12:00"),
    "sameday": [
        snap("2024-03-09T12:00"),
        snap("2024-03-10T08:00"),
        snap("2024-03-10T14:00"),
        snap("2024-03-10T20:00"),
    ],
    "oldest_sameday": [
        snap("2024-03-08T01:00"),
        snap("2024-03-08T03:00"),
        snap("2024-03-09T03:00"),
        snap("2024-03-10T03:00"),
    ],
}

CASES = [
    pytest.param(
        "jan",
        Policy(last=3),
        {
            "2024-01-30T11:00": "last #1",
            "2024-01-30T10:00": "last #2",
            "2024-01-30T09:00": "last #3",
        },
        id="last-3",
    ),
    pytest.param(
        "sameday",
        Policy(last=100),
        {
            "2024-03-10T20:00": "last #1",
            "2024-03-10T14:00": "last #2",
            "2024-03-10T08:00": "last #3",
            "2024-03-09T12:00": "last #4",
        },
        id="last-more-than-there-are",
    ),
    pytest.param(
        "jan",
        Policy(hourly=4),
        {
            "2024-01-30T11:00": "hourly #1",
            "2024-01-30T10:00": "hourly #2",
            "2024-01-30T09:00": "hourly #3",
            "2024-01-30T03:00": "hourly #4",
        },
        id="hourly-4",
    ),
    pytest.param(
        "jan",
        Policy(daily=5),
        {
            "2024-01-30T11:00": "daily #1",
            "2024-01-29T03:00": "daily #2",
            "2024-01-28T03:00": "daily #3",
            "2024-01-27T03:00": "daily #4",
            "2024-01-26T03:00": "daily #5",
        },
        id="daily-5",
    ),
    pytest.param(
        "sameday",
        Policy(daily=1),
        {"2024-03-10T20:00": "daily #1"},
        id="daily-1-newest-of-the-day",
    ),
    pytest.param(
        "sameday",
        Policy(daily=2),
        {"2024-03-10T20:00": "daily #1", "2024-03-09T12:00": "daily #2"},
        id="daily-2-one-per-day",
    ),
    pytest.param(
        "jan",
        Policy(weekly=3),
        {
            "2024-01-30T11:00": "weekly #1",
            "2024-01-28T03:00": "weekly #2",
            "2024-01-21T03:00": "weekly #3",
        },
        id="weekly-3",
    ),
    pytest.param(
        "yearend",
        Policy(weekly=4),
        {
            "2021-01-12T12:00": "weekly #1",
            "2021-01-10T12:00": "weekly #2",
            "2021-01-03T12:00": "weekly #3",  # 2020-W53, although in calendar year 2021
            "2020-12-27T12:00": "weekly #4",
        },
        id="weekly-iso-week-53",
    ),
    pytest.param(
        "yearend",
        Policy(yearly=2),
        {"2021-01-12T12:00": "yearly #1", "2020-12-31T12:00": "yearly #2"},
        id="yearly-calendar-year",
    ),
    pytest.param(
        "long",
        Policy(monthly=3),
        {
            "2024-01-30T11:00": "monthly #1",
            "2023-12-31T03:00": "monthly #2",
            "2023-11-30T03:00": "monthly #3",
        },
        id="monthly-3",
    ),
    pytest.param(
        "jan",
        Policy(monthly=2),
        {"2024-01-30T11:00": "monthly #1", "2024-01-01T03:00": "monthly[oldest] #2"},
        id="monthly-short-keeps-oldest",
    ),
    pytest.param(
        "oldest_sameday",
        Policy(daily=7),
        {
            "2024-03-10T03:00": "daily #1",
            "2024-03-09T03:00": "daily #2",
            "2024-03-08T03:00": "daily #3",
            "2024-03-08T01:00": "daily[oldest] #4",
        },
        id="daily-short-keeps-oldest-even-in-a-kept-day",
    ),
    pytest.param(
        "jan",
        Policy(last=1, hourly=2),
        {
            "2024-01-30T11:00": "last #1",
            # hour 11 is used up by the snapshot "last" kept; it does not count for hourly
            "2024-01-30T10:00": "hourly #1",
            "2024-01-30T09:00": "hourly #2",
        },
        id="kept-by-earlier-rule-uses-up-period",
    ),
    pytest.param(
        "long",
        Policy(last=2, daily=7, weekly=4, monthly=6),
        {
            "2024-01-30T11:00": "last #1",
            "2024-01-30T10:00": "last #2",
            # day 01-30 is used up by last #1
            "2024-01-29T03:00": "daily #1",
            "2024-01-28T03:00": "daily #2",
            "2024-01-27T03:00": "daily #3",
            "2024-01-26T03:00": "daily #4",
            "2024-01-25T03:00": "daily #5",
            "2024-01-24T03:00": "daily #6",
            "2024-01-23T03:00": "daily #7",
            # weeks 5 (last #1) and 4 (daily #2) are used up
            "2024-01-21T03:00": "weekly #1",
            "2024-01-14T03:00": "weekly #2",
            "2024-01-07T03:00": "weekly #3",
            "2023-12-31T03:00": "weekly #4",
            # January (last #1) and December (weekly #4) are used up
            "2023-11-30T03:00": "monthly #1",
            "2023-10-31T03:00": "monthly #2",
            "2023-09-30T03:00": "monthly #3",
            "2023-08-31T03:00": "monthly #4",
            "2023-07-31T03:00": "monthly #5",
            "2023-06-30T03:00": "monthly #6",
        },
        id="last2-daily7-weekly4-monthly6",
    ),
]


@pytest.mark.parametrize("dataset, policy, expected", CASES)
def test_plan_keeps_exactly(dataset: str, policy: Policy, expected: dict[str, str]) -> None:
    snapshots = DATASETS[dataset]
    decisions = plan(snapshots, policy, tz=UTC)

    assert [(d.name, d.created_ns) for d in decisions] == sorted(
        snapshots, key=lambda s: s[1], reverse=True
    )
    kept = {d.name.decode().removeprefix("s-"): d.reasons for d in decisions if d.keep}
    assert kept == {stamp: (reason,) for stamp, reason in expected.items()}
    assert all(d.reasons == () for d in decisions if not d.keep)


def test_plan_ignores_input_order() -> None:
    snapshots = DATASETS["long"]
    policy = Policy(last=2, daily=7, weekly=4, monthly=6)
    assert plan(list(reversed(snapshots)), policy, tz=UTC) == plan(snapshots, policy, tz=UTC)


def test_decision_fields() -> None:
    decisions = plan(DATASETS["sameday"], Policy(daily=1), tz=UTC)
    assert decisions == [
        Decision(b"s-2024-03-10T20:00", ns("2024-03-10T20:00"), True, ("daily #1",)),
        Decision(b"s-2024-03-10T14:00", ns("2024-03-10T14:00"), False, ()),
        Decision(b"s-2024-03-10T08:00", ns("2024-03-10T08:00"), False, ()),
        Decision(b"s-2024-03-09T12:00", ns("2024-03-09T12:00"), False, ()),
    ]


@pytest.mark.parametrize(
    "prefix, policy, expected_considered, expected_kept",
    [
        pytest.param(
            b"host-a-",
            Policy(last=1, prefix=b"host-a-"),
            [b"host-a-2024-03-09T12:00", b"host-a-2024-03-08T12:00", b"host-a-2024-03-07T12:00"],
            {b"host-a-2024-03-09T12:00"},
            id="last",
        ),
        pytest.param(
            b"host-b-",
            Policy(daily=1, prefix=b"host-b-"),
            [b"host-b-2024-03-10T12:00", b"host-b-2024-03-10T06:00"],
            {b"host-b-2024-03-10T12:00"},
            id="daily",
        ),
        pytest.param(
            b"host-",
            Policy(last=2, prefix=b"host-"),
            [
                b"host-b-2024-03-10T12:00",
                b"host-b-2024-03-10T06:00",
                b"host-a-2024-03-09T12:00",
                b"host-a-2024-03-08T12:00",
                b"host-a-2024-03-07T12:00",
            ],
            {b"host-b-2024-03-10T12:00", b"host-b-2024-03-10T06:00"},
            id="common-prefix",
        ),
    ],
)
def test_prefix_limits_what_is_considered(
    prefix: bytes, policy: Policy, expected_considered: list[bytes], expected_kept: set[bytes]
) -> None:
    snapshots = [
        snap("2024-03-07T12:00", "host-a-"),
        snap("2024-03-08T12:00", "host-a-"),
        snap("2024-03-09T12:00", "host-a-"),
        snap("2024-03-10T06:00", "host-b-"),
        snap("2024-03-10T12:00", "host-b-"),
        snap("2024-03-11T12:00", "manual-"),  # newest of all, but never considered
    ]
    decisions = plan(snapshots, policy, tz=UTC)
    assert [d.name for d in decisions] == expected_considered
    assert {d.name for d in decisions if d.keep} == expected_kept


def test_ties_in_time_are_ordered_by_name() -> None:
    t = ns("2024-03-10T12:00")
    snapshots = [(b"b", t), (b"c", t), (b"a", t), (b"older", t - 1)]
    decisions = plan(snapshots, Policy(last=1), tz=UTC)
    assert [(d.name, d.keep) for d in decisions] == [
        (b"c", True),
        (b"b", False),
        (b"a", False),
        (b"older", False),
    ]


@pytest.mark.parametrize(
    "tz, expected",
    [
        pytest.param(UTC, {"C": ("daily #1",), "B": ("daily #2",)}, id="utc"),
        # in UTC+1, A falls on Jan 1 and B, C on Jan 2
        pytest.param(
            timezone(timedelta(hours=1)), {"C": ("daily #1",), "A": ("daily #2",)}, id="+1"
        ),
        # in UTC-1 all three fall on Jan 1: the newest, then the oldest as the fallback
        pytest.param(
            timezone(timedelta(hours=-1)),
            {"C": ("daily #1",), "A": ("daily[oldest] #2",)},
            id="-1",
        ),
    ],
)
def test_periods_are_counted_in_the_given_time_zone(
    tz: timezone, expected: dict[str, tuple[str, ...]]
) -> None:
    snapshots = [
        (b"A", ns("2024-01-01T22:00")),
        (b"B", ns("2024-01-01T23:30")),
        (b"C", ns("2024-01-02T00:30")),
    ]
    decisions = plan(snapshots, Policy(daily=2), tz=tz)
    assert {d.name.decode(): d.reasons for d in decisions if d.keep} == expected


def test_no_snapshots() -> None:
    assert plan([], Policy(daily=7), tz=UTC) == []
    assert plan([snap("2024-03-10T12:00", "other-")], Policy(daily=7, prefix=b"s-")) == []


@pytest.mark.parametrize(
    "policy, empty",
    [
        (Policy(), True),
        (Policy(prefix=b"s-"), True),
        (Policy(last=1), False),
        (Policy(hourly=1), False),
        (Policy(daily=1), False),
        (Policy(weekly=1), False),
        (Policy(monthly=1), False),
        (Policy(yearly=1), False),
    ],
)
def test_policy_empty(policy: Policy, empty: bool) -> None:
    assert policy.empty() is empty


@pytest.mark.parametrize("snapshots", [[], DATASETS["sameday"]])
@pytest.mark.parametrize("policy", [Policy(), Policy(prefix=b"s-")])
def test_empty_policy_is_an_error(snapshots: list[tuple[bytes, int]], policy: Policy) -> None:
    with pytest.raises(CasfsError) as info:
        plan(snapshots, policy, tz=UTC)
    assert str(info.value) == "prune needs at least one --keep-* rule"


@pytest.mark.parametrize("rule", ["last", "hourly", "daily", "weekly", "monthly", "yearly"])
def test_negative_count_is_an_error(rule: str) -> None:
    policy = Policy(**{"daily": 7, rule: -1})
    with pytest.raises(CasfsError) as info:
        plan(DATASETS["sameday"], policy, tz=UTC)
    assert str(info.value) == f"--keep-{rule} must not be negative (got -1)"
