"""What the kernel holds: lookup counts and open handles, per inode.

An inode the kernel still knows (lookup count > 0) or has open (open count > 0) must not be
freed even when its last link is gone: ``Pins.is_held`` is the test the filesystem model asks
before freeing. Counting follows the pyfuse3 rules: every successful lookup, create, mkdir,
mknod, symlink and link adds one, so does every ``readdir_reply`` that returns True (pyfuse3
counts nothing itself); ``forget`` subtracts. The root is never forgotten.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


class Pins:
    def __init__(self) -> None:
        self.lookups: Counter[int] = Counter()
        self.opens: Counter[int] = Counter()

    def is_held(self, ino: int) -> bool:
        return ino in self.lookups or ino in self.opens

    def looked_up(self, ino: int) -> None:
        self.lookups[ino] += 1

    def forget(self, items: Iterable[tuple[int, int]]) -> list[int]:
        """Subtract lookups; returns the inodes that are no longer held at all."""
        released = []
        for ino, n in items:
            left = self.lookups[ino] - n
            if left > 0:
                self.lookups[ino] = left
            else:
                self.lookups.pop(ino, None)
                if ino not in self.opens:
                    released.append(ino)
        return released

    def opened(self, ino: int) -> None:
        self.opens[ino] += 1

    def closed(self, ino: int) -> bool:
        """One handle fewer; True when the inode is no longer held at all."""
        left = self.opens[ino] - 1
        if left > 0:
            self.opens[ino] = left
            return False
        self.opens.pop(ino, None)
        return ino not in self.lookups
