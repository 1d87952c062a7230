"""Retention policy for ``casfs prune``: which snapshots to keep, and why.

People who already run ``borg prune`` or ``restic forget`` have a mental model of
``--keep-daily 7 --keep-weekly 4``; casfs follows borg's algorithm (borgbackup,
``src/borg/archiver/prune_cmd.py``: ``prune_split`` and the ``borg prune`` help text) so that
the same flags keep the same snapshots. This module only decides; deleting is the caller's job,
so the decision can be printed for ``--dry-run`` and tested without a store.

The algorithm, as borg does it:

* Only snapshots whose name starts with ``Policy.prefix`` take part; the others are neither
  kept nor removed and get no :class:`Decision`.
* Snapshots are walked newest first. Ties in ``created_ns`` are broken by name, the larger
  name counting as the newer, so the order is the exact reverse of ``(created_ns, name)``.
* The rules run in the order last, hourly, daily, weekly, monthly, yearly. For each rule,
  the walk puts every snapshot in a period (local time unless ``tz`` is given: the hour, the
  day, the ISO week ``(ISO year, ISO week)``, the calendar month, the calendar year). The first
  (newest) snapshot seen in a period is that period's representative: if no earlier rule kept
  it, this rule keeps it and counts it; if an earlier rule already kept it, the period is
  used up without counting, and no older snapshot of that period is kept by this rule
  ("backups selected by previous rules do not count towards those of later rules").
  The rule stops once it has counted N.
* If a rule walks off the end with fewer than N counted, it also keeps the oldest snapshot
  (if nothing kept it yet), with the reason ``"<rule>[oldest] #k"`` (borg >= 1.2.0), so the
  first snapshot goes on ageing until a newer one can take over its slot. This can keep the
  oldest snapshot even when a newer one of the same period is already kept.
* Each kept snapshot therefore has exactly one reason, the rule that first kept it, written
  as borg's ``--list`` writes it: ``"daily #3"``. Removed snapshots have no reasons.

Where casfs differs from borg, on purpose:

* ``last`` keeps the N newest snapshots, one per snapshot; borg's ``--keep-last`` is
  ``--keep-secondly`` and would keep only one of several snapshots made in the same second.
  There are no secondly/minutely rules and no ``--keep-within``.
* A negative count is an error; borg reads it as "no limit".
* Periods are tracked as a set of periods already seen rather than borg's "same as the
  previous snapshot's period"; the two agree whenever local time only moves forward across
  the list, and the set also copes with local time stepping back over a period boundary
  (a daylight-saving change at midnight), where borg would count the same day twice.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import datetime, tzinfo

from casfs.errors import CasfsError

_NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class Policy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0
    prefix: bytes = b""  # only snapshots whose name starts with this are considered

    def empty(self) -> bool:
        """True when no keep rule is given (every count is zero)."""
        return not any(getattr(self, rule) for rule in _RULES)


@dataclass(frozen=True)
class Decision:
    name: bytes
    created_ns: int
    keep: bool
    reasons: tuple[str, ...]  # e.g. ("daily #3",); empty when removed


_Period = Callable[[datetime], Hashable]

# The period each time rule buckets by; "last" does not bucket (every snapshot is its own).
_PERIODS: dict[str, _Period] = {
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: t.isocalendar()[:2],  # (ISO year, ISO week): weeks run Monday-Sunday
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: t.year,
}
# In borg's order: finer rules first, so they get the first pick of the snapshots.
_RULES = ("last", *_PERIODS)


def _check(policy: Policy) -> None:
    for rule in _RULES:
        count = getattr(policy, rule)
        if count < 0:
            raise CasfsError(f"--keep-{rule} must not be negative (got {count})", errno.EINVAL)
    if policy.empty():
        raise CasfsError("prune needs at least one --keep-* rule", errno.EINVAL)


def plan(
    snapshots: list[tuple[bytes, int]], policy: Policy, tz: tzinfo | None = None
) -> list[Decision]:
    """Decide, for every snapshot whose name starts with ``policy.prefix``, whether to keep it.

    ``snapshots`` are ``(name, created_ns)`` pairs in any order; ``tz`` is the time zone that
    periods are counted in (``None``: the local time zone). Returns one :class:`Decision` per
    considered snapshot, newest first. Raises :class:`CasfsError` for an empty policy or a
    negative count.
    """
    _check(policy)
    todo = sorted(
        ((name, ns) for name, ns in snapshots if name.startswith(policy.prefix)),
        key=lambda s: (s[1], s[0]),
        reverse=True,
    )
    # Local time of each snapshot, to the second: periods are an hour or longer.
    times = [datetime.fromtimestamp(ns // _NS_PER_S, tz) for _, ns in todo]
    kept: dict[int, str] = {}  # index in todo -> the one reason it is kept

    for rule in _RULES:
        want = getattr(policy, rule)
        period_of = _PERIODS.get(rule)
        if want == 0 or not todo:
            continue
        count = 0
        seen: set[Hashable] = set()
        for i, when in enumerate(times):
            if period_of is not None:
                period = period_of(when)
                if period in seen:
                    continue
                seen.add(period)
            if i in kept:
                continue  # its period is used up, but it does not count for this rule
            count += 1
            kept[i] = f"{rule} #{count}"
            if count == want:
                break
        oldest = len(todo) - 1
        if count < want and oldest not in kept:
            kept[oldest] = f"{rule}[oldest] #{count + 1}"

    return [
        Decision(name, ns, i in kept, (kept[i],) if i in kept else ())
        for i, (name, ns) in enumerate(todo)
    ]
