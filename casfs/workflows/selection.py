r"""What ``casfs import`` takes from its source: everything, less what the user excludes.

Patterns (``--exclude``, ``--exclude-from``) follow the glob rules restic and rsync users
know, on paths relative to the source directory with ``/`` between names:

* ``*`` and ``?`` match within one name, ``[abc]``/``[!abc]`` one character of a set, and
  ``**`` any number of whole names (``**/build``, ``src/**/*.o``, ``logs/**``);
* a pattern with no ``/`` in it matches an entry's name at any depth (``*.pyc``,
  ``node_modules``); one with a ``/`` is anchored at the source (``build/cache``; a leading
  ``/`` changes nothing);
* a trailing ``/`` matches directories only (``tmp/``);
* a leading ``!`` takes back what an earlier pattern left out (``*.log`` then ``!keep.log``):
  the last pattern that matches an entry decides, as in gitignore and restic. An excluded
  directory is not entered, so nothing below it can be taken back: leave out its contents
  instead (``cache/*`` then ``!cache/index``). ``\!`` and ``\#`` start a pattern with a
  literal ``!`` or ``#`` (also after a ``!``: ``!\!x``).

An excluded directory is not listed at all. ``--exclude-if-present NAME`` leaves out every
directory that holds an entry called NAME (``.nobackup``), as borg and restic do.
``--exclude-caches`` keeps a directory holding a valid ``CACHEDIR.TAG``
(https://bford.info/cachedir/) with only that file in it, as restic does.

The files cache (:mod:`casfs.workflows.filescache`) is kept per selection (:meth:`key`): an
unchanged directory's tree object is reused whole, which is right only if the same entries
of it were taken last time.
"""

from __future__ import annotations

import errno
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

from casfs.errors import CasfsError

CACHEDIR_TAG = b"CACHEDIR.TAG"
CACHEDIR_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"


def read_patterns(path: str) -> list[str]:
    """The patterns of an ``--exclude-from`` file: one a line; blank lines and lines
    starting with ``#`` are skipped, as are the line's trailing spaces."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise CasfsError(f"cannot read exclude file {path}: {exc.strerror}", exc.errno) from None
    patterns = []
    for line in lines:
        line = line.rstrip(b" \t\r")
        if line and not line.startswith(b"#"):
            patterns.append(os.fsdecode(line))
    return patterns


_STAR = b"[^/]*"  # '*': any characters within one name


def _translate(pattern: bytes) -> bytes:
    """A regular expression (for fullmatch) for one glob pattern without its trailing ``/``.

    A ``*`` followed by fixed characters and another ``*`` (``*_*_*.tmp``) becomes an atomic
    group that takes the first place those characters occur: a later place could only leave
    more for the next ``*`` to take, within the same name. Plain regex backtracking would
    try every split instead: ``*a*a*a*a*b`` against a name of 200 ``a``s took seconds, more
    stars minutes, and the name is the source's, not the user's."""
    tokens = _tokens(pattern)
    out = []
    k = 0
    while k < len(tokens):
        regex = tokens[k][0]
        if regex == _STAR:
            end = k + 1  # the fixed pieces after this '*'
            while end < len(tokens) and tokens[end][1]:
                end += 1
            if end > k + 1 and end < len(tokens) and tokens[end][0] == _STAR:
                out.append(b"(?>[^/]*?" + b"".join(r for r, _ in tokens[k + 1 : end]) + b")")
                k = end
                continue
        out.append(regex)
        k += 1
    return b"".join(out)


def _tokens(pattern: bytes) -> list[tuple[bytes, bool]]:
    """The pattern's pieces as (regex, fixed): fixed pieces match one character that is
    never a '/' (a literal or '?')."""
    out: list[tuple[bytes, bool]] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i : i + 1]
        if c == b"*":
            if pattern[i : i + 2] == b"**":
                i += 2
                if pattern[i : i + 1] == b"/":
                    out.append((b"(?:.*/)?", False))  # any number of whole names, or none
                    i += 1
                else:
                    out.append((b".*", False))
                continue
            out.append((_STAR, False))
        elif c == b"?":
            out.append((b"[^/]", True))
        elif c == b"[":
            start = i + 1
            negated = pattern[start : start + 1] == b"!"
            start += negated
            # a "]" right after the opening (or "[!") is a member, not the end
            end = pattern.find(b"]", start + (pattern[start : start + 1] == b"]"))
            if end < 0:
                out.append((re.escape(c), True))
            else:
                members = (pattern[k : k + 1] for k in range(start, end))
                body = b"".join(m if m == b"-" else re.escape(m) for m in members)
                out.append((b"[" + (b"^" if negated else b"") + body + b"]", False))
                i = end
        else:
            out.append((re.escape(c), c != b"/"))
        i += 1
    return out


@dataclass(frozen=True)
class Selection:
    """The paths below the source an import takes (see the module's docstring)."""

    exclude: tuple[str, ...] = ()
    exclude_caches: bool = False
    one_file_system: bool = False  # do not descend into other mounts (keep them empty)
    exclude_if_present: tuple[str, ...] = ()  # names that mark a directory to leave out
    _by_name: tuple[re.Pattern[bytes] | None, re.Pattern[bytes] | None] = field(
        init=False, repr=False, compare=False
    )
    _by_path: tuple[re.Pattern[bytes] | None, re.Pattern[bytes] | None] = field(
        init=False, repr=False, compare=False
    )
    _ordered: tuple[_Rule, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rules = [_Rule.parse(text) for text in self.exclude]
        for tag in self.exclude_if_present:
            if not tag or "/" in tag or tag in (".", ".."):
                why = "a name, not a path"
                raise CasfsError(f"bad --exclude-if-present {tag!r}: {why}", errno.EINVAL)
        # With a negated pattern the order matters: the rules are asked last to first.
        # Without, any match excludes, and the rules are joined into one regex per kind:
        # [any entry, directories only], for patterns on names and on paths.
        ordered = tuple(reversed(rules)) if any(r.negated for r in rules) else ()
        names: tuple[list[bytes], list[bytes]] = ([], [])
        paths: tuple[list[bytes], list[bytes]] = ([], [])
        for rule in () if ordered else rules:
            (paths if rule.anchored else names)[rule.dirs_only].append(rule.regex.pattern)
        object.__setattr__(self, "_ordered", ordered)
        object.__setattr__(self, "_by_name", tuple(_one(r) for r in names))
        object.__setattr__(self, "_by_path", tuple(_one(r) for r in paths))

    @classmethod
    def of(
        cls,
        exclude: Iterable[str] = (),
        exclude_caches: bool = False,
        one_file_system: bool = False,
        exclude_if_present: Iterable[str] = (),
    ) -> Selection:
        return cls(
            tuple(exclude), bool(exclude_caches), bool(one_file_system), tuple(exclude_if_present)
        )

    @property
    def filters(self) -> bool:
        """True when some entry may be left out by a pattern or a cache tag."""
        return bool(self.exclude) or self.exclude_caches

    def tags(self) -> frozenset[bytes]:
        """The names whose presence leaves a directory out (``--exclude-if-present``)."""
        return frozenset(os.fsencode(t) for t in self.exclude_if_present)

    def excluded(self, rel: bytes, name: bytes, is_dir: bool) -> bool:
        """Whether the entry ``name`` at ``rel`` (relative to the source) is left out."""
        if self._ordered:
            for rule in self._ordered:
                if rule.matches(rel, name, is_dir):
                    return not rule.negated
            return False
        for matcher, subject in ((self._by_name, name), (self._by_path, rel)):
            anything, dirs = matcher
            if anything is not None and anything.fullmatch(subject):
                return True
            if is_dir and dirs is not None and dirs.fullmatch(subject):
                return True
        return False

    def key(self) -> bytes:
        """What tells this selection from another, for the files cache; empty for a whole
        tree (the cache of an import without options keeps its old name)."""
        if not (self.filters or self.one_file_system or self.exclude_if_present):
            return b""
        parts = [b"x" if self.one_file_system else b"", b"c" if self.exclude_caches else b""]
        patterns = [b"e" + os.fsencode(p) for p in self.exclude]
        parts += patterns if self._ordered else sorted(patterns)  # (negation: order counts)
        parts += sorted(b"t" + tag for tag in self.tags())
        # Each part with its length: no pattern or tag, whatever bytes it holds, can pass
        # for two parts or for a part of another kind.
        return b"2" + b"".join(len(p).to_bytes(4, "big") + p for p in parts)

    def describe(self) -> dict:
        """For the mount's control socket (JSON)."""
        return {
            "exclude": list(self.exclude),
            "exclude_caches": self.exclude_caches,
            "one_file_system": self.one_file_system,
            "exclude_if_present": list(self.exclude_if_present),
        }

    @classmethod
    def from_request(cls, r: dict) -> Selection:
        exclude, tags = r.get("exclude") or [], r.get("exclude_if_present") or []
        for names in (exclude, tags):
            if not isinstance(names, list) or not all(isinstance(p, str) for p in names):
                raise CasfsError("exclude options must be lists of strings", errno.EINVAL)
        return cls.of(exclude, bool(r.get("exclude_caches")), bool(r.get("one_file_system")), tags)


@dataclass(frozen=True)
class _Rule:
    """One exclude pattern: what it matches and whether it takes back (``!``)."""

    regex: re.Pattern[bytes]
    anchored: bool  # matched against the path below the source, not the name
    dirs_only: bool
    negated: bool

    @classmethod
    def parse(cls, text: str) -> _Rule:
        pattern = os.fsencode(text)
        negated = pattern.startswith(b"!")
        if negated:
            pattern = pattern[1:]
        if pattern[:2] in (b"\\!", b"\\#"):
            pattern = pattern[1:]  # a literal '!' or '#' (as in gitignore)
        dirs_only = pattern.endswith(b"/")
        body = pattern.rstrip(b"/")
        if not body:
            raise CasfsError(f"bad exclude pattern {text!r}: it matches nothing", errno.EINVAL)
        if b"\0" in body:
            raise CasfsError(f"bad exclude pattern {text!r}: a NUL byte", errno.EINVAL)
        anchored = b"/" in body
        regex = _translate(body.lstrip(b"/") if anchored else body)
        try:
            compiled = _compile(regex)
        except re.error as exc:  # e.g. a range backwards: [z-a]
            raise CasfsError(f"bad exclude pattern {text!r}: {exc}", errno.EINVAL) from None
        return cls(compiled, anchored, dirs_only, negated)

    def matches(self, rel: bytes, name: bytes, is_dir: bool) -> bool:
        if self.dirs_only and not is_dir:
            return False
        return self.regex.fullmatch(rel if self.anchored else name) is not None


def _one(regexes: list[bytes]) -> re.Pattern[bytes] | None:
    if not regexes:
        return None
    return _compile(b"|".join(b"(?:" + r + b")" for r in regexes))


def _compile(regex: bytes) -> re.Pattern[bytes]:
    with warnings.catch_warnings():  # ("possible set difference": '--' in a set is literal)
        warnings.simplefilter("ignore", FutureWarning)
        return re.compile(regex, re.DOTALL)


def is_cache_dir(dir_fd: int) -> bool:
    """Whether the directory open as ``dir_fd`` holds a valid CACHEDIR.TAG (a regular file
    starting with the signature)."""
    try:
        fd = os.open(CACHEDIR_TAG, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        return os.read(fd, len(CACHEDIR_SIGNATURE)) == CACHEDIR_SIGNATURE
    except OSError:
        return False
    finally:
        os.close(fd)
