"""The relay queue: claiming due deliveries with a lease and recording attempts."""

from __future__ import annotations

from mailstack.store.base import StoreBase


class QueueMixin(StoreBase):
    pass
