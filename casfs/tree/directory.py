"""Directory entries with stable readdir cookies.

Each entry is kept twice: by name (``dirents``, for lookup) and by cookie (``dircookies``, for
listing in a fixed order). A directory's cookies come from a counter in its inode that only
grows, so an entry added or removed during a listing never shifts another one: a reader that
resumes after cookie N sees exactly the entries with larger cookies.
"""

from __future__ import annotations

from collections.abc import Iterator

from casfs.store import layout
from casfs.store.store import Tx
from casfs.tree.records import Inode


def find(tx: Tx, parent: int, name: bytes) -> int | None:
    """The child inode named ``name`` in ``parent``, or None."""
    value = tx.get(b"dirents", layout.dirent_key(parent, name))
    return layout.read_dirent_value(value)[0] if value else None


def add(tx: Tx, parent: Inode, name: bytes, child: int) -> Inode:
    """Add an entry; returns the parent with its cookie counter advanced (caller stores it)."""
    cookie = parent.next_cookie
    tx.put(b"dirents", layout.dirent_key(parent.ino, name), layout.dirent_value(child, cookie))
    tx.put(b"dircookies", layout.cookie_key(parent.ino, cookie), layout.cookie_value(child, name))
    return parent.but(next_cookie=cookie + 1)


def remove(tx: Tx, parent: int, name: bytes) -> int:
    """Remove an entry; returns the child inode it named."""
    key = layout.dirent_key(parent, name)
    child, cookie = layout.read_dirent_value(tx.get(b"dirents", key))
    tx.delete(b"dirents", key)
    tx.delete(b"dircookies", layout.cookie_key(parent, cookie))
    return child


def retarget(tx: Tx, parent: int, name: bytes, child: int) -> None:
    """Point an existing entry at another inode, keeping its cookie (rename over a name)."""
    key = layout.dirent_key(parent, name)
    _, cookie = layout.read_dirent_value(tx.get(b"dirents", key))
    tx.put(b"dirents", key, layout.dirent_value(child, cookie))
    tx.put(b"dircookies", layout.cookie_key(parent, cookie), layout.cookie_value(child, name))


def is_empty(tx: Tx, parent: int) -> bool:
    return next(tx.prefix(b"dirents", layout.ino_key(parent)), None) is None


def entries(tx: Tx, parent: int, after: int = 0) -> Iterator[tuple[int, bytes, int]]:
    """(cookie, name, child) for every entry with a cookie greater than ``after``."""
    prefix = layout.ino_key(parent)
    for key, value in tx.prefix(b"dircookies", prefix, layout.u64(after + 1)):
        _, cookie = layout.read_cookie_key(key)
        child, name = layout.read_cookie_value(value)
        yield cookie, name, child
