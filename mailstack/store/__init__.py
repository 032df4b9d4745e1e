"""The mail store: SQLAlchemy 2 on SQLite (default) or PostgreSQL."""

from mailstack.store.accounts import DEFAULT_MAILBOXES, AccountsMixin
from mailstack.store.base import AlreadyExists, NotFound, StoreError
from mailstack.store.delivery import Appended, DeliveryMixin, new_queue_id
from mailstack.store.mailboxes import INBOX, OUTBOX, MailboxesMixin, MailboxStatus, canonical_name
from mailstack.store.messages import MessagesMixin
from mailstack.store.migrate import SchemaError
from mailstack.store.queue import QueueMixin


class Store(AccountsMixin, MailboxesMixin, DeliveryMixin, MessagesMixin, QueueMixin):
    """The SQL implementation of every store operation the services use.

    Open it with ``await Store.open(url)``, which migrates the schema first.
    Returned ORM objects are detached snapshots: change data only through the
    store's methods.
    """


__all__ = [
    "DEFAULT_MAILBOXES",
    "INBOX",
    "OUTBOX",
    "AlreadyExists",
    "Appended",
    "MailboxStatus",
    "NotFound",
    "SchemaError",
    "Store",
    "StoreError",
    "canonical_name",
    "new_queue_id",
]
