"""SQLAlchemy 2 table mappings of the mail store.

The schema itself is created and changed only by the Alembic migrations in
``mailstack/store/migrations``; these classes must match the newest revision.
"""

from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Flag(enum.IntFlag):
    """IMAP system flags stored as a bit mask so that SEARCH can test them in SQL."""

    SEEN = 1
    ANSWERED = 2
    FLAGGED = 4
    DELETED = 8
    DRAFT = 16


SYSTEM_FLAG_NAMES = {
    Flag.SEEN: "\\Seen",
    Flag.ANSWERED: "\\Answered",
    Flag.FLAGGED: "\\Flagged",
    Flag.DELETED: "\\Deleted",
    Flag.DRAFT: "\\Draft",
}


class DeliveryState(str, enum.Enum):
    QUEUED = "queued"  # waiting for its first or next attempt
    DEFERRED = "deferred"  # an attempt failed temporarily; next_attempt says when
    HELD = "held"  # kept back by an operator until released
    DELIVERED = "delivered"  # final: the peer answered 2xx
    BOUNCED = "bounced"  # final: permanent failure or queue lifetime exceeded
    CANCELLED = "cancelled"  # final: the sender took the message back

    @property
    def final(self) -> bool:
        return self in (DeliveryState.DELIVERED, DeliveryState.BOUNCED, DeliveryState.CANCELLED)


class UTCDateTime(TypeDecorator):
    """A timestamp stored as naive UTC and returned timezone-aware.

    SQLite keeps no time zone, so every value is converted to UTC before it is
    written; comparisons in SQL then order correctly on every backend.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc)


Timestamp = UTCDateTime


class Domain(Base):
    __tablename__ = "domains"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    created: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="RESTRICT"), index=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)

    domain: Mapped[Domain] = relationship(lazy="joined")


class Alias(Base):
    __tablename__ = "aliases"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(320), unique=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"), index=True)


class Mailbox(Base):
    __tablename__ = "mailboxes"
    __table_args__ = (UniqueConstraint("account_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(1024))
    uidvalidity: Mapped[int] = mapped_column(BigInteger)
    uidnext: Mapped[int] = mapped_column(BigInteger, default=1)
    highestmodseq: Mapped[int] = mapped_column(BigInteger, default=1)
    special_use: Mapped[str | None] = mapped_column(String(32), nullable=True)
    subscribed: Mapped[bool] = mapped_column(Boolean, default=True)
    created: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)


class MessageContent(Base):
    """The bytes of a message, stored once however many mailboxes hold it."""

    __tablename__ = "message_contents"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)


class Message(Base):
    """One message in one mailbox, with its IMAP UID, MODSEQ and flags."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("mailbox_id", "uid"),
        Index("ix_messages_mailbox_modseq", "mailbox_id", "modseq"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    uid: Mapped[int] = mapped_column(BigInteger)
    modseq: Mapped[int] = mapped_column(BigInteger)
    flags: Mapped[int] = mapped_column(Integer, default=0)
    # Keywords as a space-separated list of IMAP atoms, without system flags.
    keywords: Mapped[str] = mapped_column(Text, default="")
    internal_date: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    size: Mapped[int] = mapped_column(BigInteger)
    content_sha256: Mapped[str] = mapped_column(
        ForeignKey("message_contents.sha256", ondelete="RESTRICT"), index=True
    )
    # The outbound queue entry for a message in an Outbox, so that expunging it
    # there cancels its pending deliveries.
    queue_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)


class Expunged(Base):
    """A tombstone per expunged message, so sessions and CONDSTORE see removals by MODSEQ."""

    __tablename__ = "expunged"
    __table_args__ = (Index("ix_expunged_mailbox_modseq", "mailbox_id", "modseq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    mailbox_id: Mapped[int] = mapped_column(ForeignKey("mailboxes.id", ondelete="CASCADE"))
    uid: Mapped[int] = mapped_column(BigInteger)
    modseq: Mapped[int] = mapped_column(BigInteger)


class OutboundMessage(Base):
    """A message waiting in the relay queue: the unit that `mailstack queue` shows."""

    __tablename__ = "outbound_messages"

    queue_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    account_id: Mapped[int | None] = mapped_column(
        ForeignKey("accounts.id", ondelete="SET NULL"), nullable=True, index=True
    )
    envelope_sender: Mapped[str] = mapped_column(String(320))
    content_sha256: Mapped[str] = mapped_column(ForeignKey("message_contents.sha256", ondelete="RESTRICT"))
    size: Mapped[int] = mapped_column(BigInteger)
    created: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    # A bounce or delay notice is generated for this message only once.
    delay_warned: Mapped[bool] = mapped_column(Boolean, default=False)

    deliveries: Mapped[list[Delivery]] = relationship(
        back_populates="message", cascade="all, delete-orphan", order_by="Delivery.id"
    )


class Delivery(Base):
    """One recipient of an outbound message and the state of its delivery."""

    __tablename__ = "deliveries"
    __table_args__ = (Index("ix_deliveries_due", "state", "next_attempt"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    queue_id: Mapped[str] = mapped_column(
        ForeignKey("outbound_messages.queue_id", ondelete="CASCADE"), index=True
    )
    recipient: Mapped[str] = mapped_column(String(320))
    domain: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.QUEUED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_expiry: Mapped[dt.datetime | None] = mapped_column(Timestamp, nullable=True)
    last_reply: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)
    updated: Mapped[dt.datetime] = mapped_column(Timestamp, default=utcnow)

    message: Mapped[OutboundMessage] = relationship(back_populates="deliveries")
