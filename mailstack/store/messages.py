"""Message operations for mailbox access: fetch, flags, expunge, copy, move, changes."""

from __future__ import annotations

from mailstack.store.base import StoreBase


class MessagesMixin(StoreBase):
    pass
