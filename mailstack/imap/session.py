"""IMAP command handlers run against the store, one ``Session`` per connection.

The session never touches the socket: the connection in ``server.py`` parses
each command, calls :meth:`Session.handle`, and writes what the session
queued with ``emit`` followed by the tagged reply. Errors are raised as the
``ImapError`` subclasses of ``response.py``, each rendering its own NO or BAD
with an RFC 5530 response code.

States (RFC 3501 section 3) and the commands each allows:

================  =====================================================
not authenticated CAPABILITY NOOP LOGOUT ID STARTTLS LOGIN AUTHENTICATE
authenticated     the above except STARTTLS/LOGIN/AUTHENTICATE, plus
                  SELECT EXAMINE CREATE DELETE RENAME SUBSCRIBE
                  UNSUBSCRIBE LIST LSUB STATUS APPEND NAMESPACE ENABLE
                  IDLE
selected          the above plus CHECK CLOSE UNSELECT EXPUNGE SEARCH
                  FETCH STORE COPY MOVE and their UID forms
================  =====================================================
"""

from __future__ import annotations

import asyncio
import enum
import importlib.metadata
import logging
from collections.abc import Callable
from dataclasses import dataclass

from mailstack.imap import commands as c
from mailstack.imap import response as r
from mailstack.imap.fetch import FetchRenderer
from mailstack.imap.search import MAX_SEARCH_KEYS, count_keys, search
from mailstack.imap.throttle import LoginThrottle
from mailstack.imap.view import MailboxView, Update, encoded_flags, split_flags
from mailstack.settings import IMAPSection
from mailstack.store import INBOX, OUTBOX, AlreadyExists, NotFound, Store, StoreError, canonical_name
from mailstack.store.messages import FlagMode, MailboxChanges, MessageState
from mailstack.store.models import Flag

log = logging.getLogger(__name__)

try:
    SERVER_VERSION = importlib.metadata.version("mailstack")
except importlib.metadata.PackageNotFoundError:  # running from a source tree without metadata
    SERVER_VERSION = "unknown"

DELIMITER = "/"
MAX_MAILBOX_NAME = 1000
# Commits by other processes call no listener here, so after a command the store is read
# again unless it was read less than this many seconds ago and no local commit touched
# the mailbox. Changes by other processes thus reach a session at most this much later.
RECHECK_INTERVAL = 0.5
# Most messages, and most bytes of them, whose content FETCH reads in one query.
FETCH_BATCH = 250
FETCH_BATCH_BYTES = 16 * 1024 * 1024
SPECIAL_USE_ATTRIBUTES = ("\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash")
SYSTEM_FLAG_LIST = ["\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"]
SYSTEM_FLAGS_LOWER = frozenset(name.lower() for name in SYSTEM_FLAG_LIST)
# Maximum distinct keywords in one mailbox (compared case-insensitively), and maximum
# keyword length in characters, which are octets because keywords are ASCII atoms.
# Every SELECT sends all of a mailbox's keywords in FLAGS and PERMANENTFLAGS.
MAX_KEYWORDS = 1000
MAX_KEYWORD_LENGTH = 256


class State(enum.Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


ANY_STATE = (c.Capability, c.Noop, c.Logout, c.Id)
NOT_AUTHENTICATED_ONLY = (c.StartTLS, c.Login, c.Authenticate)
SELECTED_ONLY = (c.Check, c.Close, c.Unselect, c.Expunge, c.Search, c.Fetch, c.Store, c.Copy, c.Move)
# Non-UID forms of these must not cause EXPUNGE responses (RFC 3501 section 7.4.1).
NO_EXPUNGE_COMMANDS = (c.Fetch, c.Store, c.Search)


@dataclass(frozen=True)
class ClientInfo:
    """The peer of one connection, for logs and throttling."""

    address: str
    port: int
    session_id: str


class ChangeHub:
    """Wakes the sessions that have a mailbox selected when a change to it is committed.

    Commits in this process arrive through one store listener, so a commit
    costs one dictionary lookup per changed mailbox. Commits by other
    processes call no listener here. For them, while any session is in IDLE,
    one task reads the HIGHESTMODSEQ of every mailbox in IDLE each
    ``poll_interval`` seconds, in one query however many sessions wait.
    """

    def __init__(self, store: Store, poll_interval: float = 0.5) -> None:
        self.store = store
        self.poll_interval = poll_interval
        self._waiters: dict[int, set[asyncio.Event]] = {}
        self._idling: dict[asyncio.Event, int] = {}
        self._known: dict[int, int] = {}
        self._poller: asyncio.Task | None = None
        self._remove = store.add_mailbox_listener(self._changed)

    def _changed(self, mailbox_ids: frozenset[int]) -> None:
        for mailbox_id in mailbox_ids:
            for event in self._waiters.get(mailbox_id, ()):
                event.set()

    def watch(self, mailbox_id: int, event: asyncio.Event) -> None:
        self._waiters.setdefault(mailbox_id, set()).add(event)

    def unwatch(self, mailbox_id: int, event: asyncio.Event) -> None:
        waiters = self._waiters.get(mailbox_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del self._waiters[mailbox_id]
        self.stop_idle(event)

    def start_idle(self, mailbox_id: int, event: asyncio.Event, modseq: int) -> None:
        """Poll the mailbox for changes by other processes while the session is in IDLE."""
        self._idling[event] = mailbox_id
        # The lowest MODSEQ any idle session has seen, so the poll wakes every session behind.
        self._known[mailbox_id] = min(self._known.get(mailbox_id, modseq), modseq)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    def stop_idle(self, event: asyncio.Event) -> None:
        mailbox_id = self._idling.pop(event, None)
        if mailbox_id is not None and mailbox_id not in self._idling.values():
            self._known.pop(mailbox_id, None)

    async def _poll(self) -> None:
        while self._idling:
            await asyncio.sleep(self.poll_interval)
            mailbox_ids = set(self._idling.values())
            if not mailbox_ids:
                break
            try:
                current = await self.store.highest_modseqs(mailbox_ids)
            except Exception:
                log.exception("polling mailboxes %s for changes failed; retrying", sorted(mailbox_ids)[:20])
                continue
            for mailbox_id in mailbox_ids:
                modseq = current.get(mailbox_id)
                known = self._known.get(mailbox_id)
                if known is None or modseq == known:
                    continue
                # A deleted mailbox (no MODSEQ any more) wakes its sessions too.
                if modseq is not None:
                    self._known[mailbox_id] = modseq
                for event in self._waiters.get(mailbox_id, ()):
                    event.set()

    def close(self) -> None:
        self._remove()
        if self._poller is not None:
            self._poller.cancel()


class MailboxPattern:
    """A LIST pattern: ``*`` matches anything, ``%`` anything but the delimiter.

    Matching runs the pattern as a nondeterministic automaton over the name, with
    the set of reachable pattern positions kept as bits of one integer. It takes
    one step per character of the name, whatever the wildcards, so no pattern can
    make it backtrack. When the full pattern starts with INBOX, those five
    characters match in any case (compared after ``str.upper``, as
    ``canonical_name`` does).
    """

    def __init__(self, reference: str, pattern: str) -> None:
        if reference.endswith(DELIMITER) and pattern.startswith(DELIMITER):
            pattern = pattern[1:]
        full = reference + pattern
        # Collapse each run of wildcards: a run with any * is one *, a run of % alone is one %.
        tokens: list[str] = []
        for char in full:
            if char in "*%" and tokens and tokens[-1] in ("*", "%"):
                if char == "*":
                    tokens[-1] = "*"
                continue
            tokens.append(char)

        inbox_prefix = full[:5].upper() == INBOX
        self._exact: dict[str, int] = {}
        self._folded: dict[str, int] = {}
        self._star = 0
        self._percent = 0
        for position, token in enumerate(tokens):
            bit = 1 << position
            if token == "*":
                self._star |= bit
            elif token == "%":
                self._percent |= bit
            elif inbox_prefix and position < 5:
                self._folded[INBOX[position]] = self._folded.get(INBOX[position], 0) | bit
            else:
                self._exact[token] = self._exact.get(token, 0) | bit
        self._accept = 1 << len(tokens)
        # Each literal needs one character, so a shorter name is rejected before the loop.
        # This also bounds the integers in the loop to about twice the name's length in bits.
        self._min_length = len(tokens) - bin(self._star | self._percent).count("1")

    def _close(self, positions: int) -> int:
        # A wildcard may match nothing. Runs were collapsed, so one step reaches every position.
        return positions | ((positions & (self._star | self._percent)) << 1)

    def match(self, name: str) -> bool:
        """Return True when ``name`` matches the whole pattern."""
        if len(name) < self._min_length:
            return False
        positions = self._close(1)
        for char in name:
            wildcards = self._star if char == DELIMITER else self._star | self._percent
            literals = self._exact.get(char, 0)
            if self._folded:
                literals |= self._folded.get(char.upper(), 0)
            positions = self._close((positions & wildcards) | ((positions & literals) << 1))
            if not positions:
                return False
        return bool(positions & self._accept)


def mailbox_pattern(reference: str, pattern: str) -> MailboxPattern:
    """Compile a LIST pattern given relative to ``reference``."""
    return MailboxPattern(reference, pattern)


class Session:
    """The state of one IMAP session and a handler per command."""

    def __init__(
        self,
        *,
        store: Store,
        config: IMAPSection,
        hub: ChangeHub,
        throttle: LoginThrottle,
        client: ClientInfo,
        tls_active: bool,
        emit: Callable[[bytes], None],
        drain: Callable[[], object],
    ) -> None:
        self.store = store
        self.config = config
        self.hub = hub
        self.throttle = throttle
        self.client = client
        self.tls_active = tls_active
        self.emit = emit
        self._drain = drain
        self.state = State.NOT_AUTHENTICATED
        self.account_id: int | None = None
        self.username: str | None = None
        self.view: MailboxView | None = None
        self.changed = asyncio.Event()
        # Loop time of the last read of the selected mailbox's changes from the store.
        self.checked_at = 0.0

    # Capabilities -----------------------------------------------------------------

    def capabilities(self) -> list[str]:
        names = ["IMAP4rev1", "LITERAL+", "ID", "ENABLE", "IDLE", "NAMESPACE", "UNSELECT"]
        if self.state is State.NOT_AUTHENTICATED:
            if self.tls_active:
                names += ["AUTH=PLAIN", "SASL-IR"]
            else:
                names += ["STARTTLS", "LOGINDISABLED"]
        else:
            names += [
                "UIDPLUS",
                "MOVE",
                "SPECIAL-USE",
                "CHILDREN",
                f"APPENDLIMIT={self.config.append_limit}",
            ]
        return names

    def capability_code(self) -> bytes:
        return b"CAPABILITY " + " ".join(self.capabilities()).encode("ascii")

    # Dispatch -----------------------------------------------------------------------

    def check_state(self, command: c.Command) -> None:
        """Raise BAD when ``command`` is not allowed in the current state."""
        if isinstance(command, ANY_STATE):
            return
        if self.state is State.NOT_AUTHENTICATED:
            if not isinstance(command, NOT_AUTHENTICATED_ONLY):
                raise r.BadCommand(f"{command.name} is not allowed before login")
            return
        if isinstance(command, NOT_AUTHENTICATED_ONLY):
            raise r.BadCommand(f"{command.name} is not allowed after login")
        if isinstance(command, SELECTED_ONLY) and self.state is not State.SELECTED:
            raise r.BadCommand(f"{command.name} needs a selected mailbox; use SELECT first")

    async def handle(self, command: c.Command) -> bytes:
        """Run one command; queue untagged responses with ``emit`` and return the tagged reply."""
        self.check_state(command)
        handler = HANDLERS.get(type(command))
        if handler is None:
            raise r.BadCommand(f"{command.NAME} is not supported here")
        reply = await handler(self, command)
        if self.state is State.SELECTED and not isinstance(command, (c.Select, c.Examine)):
            allow_expunge = not isinstance(command, NO_EXPUNGE_COMMANDS) or getattr(command, "uid", False)
            await self.sync(allow_expunge=allow_expunge)
        return reply

    def ok(self, command: c.Command, text: str | None = None, code: bytes | None = None) -> bytes:
        return r.tagged(command.tag, b"OK", text or f"{command.name} completed", code)

    # Change notification ----------------------------------------------------------

    async def sync(self, *, allow_expunge: bool) -> bool:
        """Read changes to the selected mailbox and emit them; return True if anything was sent."""
        view = self.view
        if view is None:
            return False
        now = asyncio.get_running_loop().time()
        if not self.changed.is_set() and now - self.checked_at < RECHECK_INTERVAL:
            # No commit in this process touched the mailbox, and the store was read moments
            # ago: skip the query. Only expunges held back earlier may be due now.
            if not (allow_expunge and view.pending_expunges):
                return False
            changes = MailboxChanges(view.modseq, view.uidnext, [], [])
            update = view.apply(changes, allow_expunge=True)
            self.emit_update(update)
            return bool(update)
        self.changed.clear()
        self.checked_at = now
        try:
            changes = await self.store.changes_since(view.mailbox_id, view.modseq)
        except NotFound:
            # Another session deleted the selected mailbox: nothing in the view is valid any more.
            self._deselect()
            raise r.Bye("the selected mailbox was deleted by another session")
        if changes.uidvalidity is not None and changes.uidvalidity != view.uidvalidity:
            # Renamed by another session: the client's UIDs no longer fit the name it selected.
            self._deselect()
            raise r.Bye("the selected mailbox was renamed by another session")
        update = view.apply(changes, allow_expunge=allow_expunge)
        self.emit_update(update)
        return bool(update)

    def emit_update(self, update: Update) -> None:
        view = self.view
        assert view is not None
        for sequence_number in update.expunged:
            self.emit(b"* %d EXPUNGE\r\n" % sequence_number)
        if update.new_keywords:
            self.emit_flags()
        if update.exists is not None:
            self.emit(b"* %d EXISTS\r\n" % update.exists)
        for sequence_number, state in update.fetches:
            self.emit(
                r.fetch_response(
                    sequence_number,
                    [b"UID %d" % state.uid, encoded_flags(state.flags, state.keywords)],
                )
            )

    def emit_flags(self) -> None:
        view = self.view
        assert view is not None
        keywords = sorted(view.keywords, key=str.lower)
        self.emit(r.untagged(b"FLAGS " + r.flag_list(SYSTEM_FLAG_LIST + keywords)))
        if view.read_only:
            self.emit(r.untagged_status(b"OK", "no permanent flags in a read-only mailbox", b"PERMANENTFLAGS ()"))
        else:
            permanent = r.flag_list(SYSTEM_FLAG_LIST + keywords + ["\\*"])
            self.emit(r.untagged_status(b"OK", "flags and keywords can be stored", b"PERMANENTFLAGS " + permanent))

    def _deselect(self) -> None:
        if self.view is not None:
            self.hub.unwatch(self.view.mailbox_id, self.changed)
        self.view = None
        if self.state is State.SELECTED:
            self.state = State.AUTHENTICATED

    def close(self) -> None:
        self._deselect()
        self.state = State.LOGOUT

    # Any state ------------------------------------------------------------------

    async def do_capability(self, command: c.Capability) -> bytes:
        self.emit(r.untagged(b"CAPABILITY " + " ".join(self.capabilities()).encode("ascii")))
        return self.ok(command)

    async def do_noop(self, command: c.Noop) -> bytes:
        return self.ok(command)

    async def do_logout(self, command: c.Logout) -> bytes:
        self.emit(r.untagged_status(b"BYE", "logging out"))
        self.close()
        return self.ok(command)

    async def do_id(self, command: c.Id) -> bytes:
        if command.parameters:
            fields = ", ".join(f"{k}={v!r}" for k, v in command.parameters[:10])
            log.info("session %s: client ID %s", self.client.session_id, fields[:300])
        self.emit(r.untagged(b"ID " + r.encode(["name", "mailstack", "version", SERVER_VERSION])))
        return self.ok(command)

    # Login ------------------------------------------------------------------------

    async def do_login(self, command: c.Login) -> bytes:
        return await self.login(command.tag, command.username, command.password, command.name)

    def check_authenticate(self, command: c.Authenticate) -> None:
        """Raise the NO for an AUTHENTICATE that cannot succeed.

        The connection calls this before it sends the ``+`` continuation, so a client
        is never invited to send credentials over plaintext or for an unknown mechanism.
        """
        if not self.tls_active:
            log.info("session %s: AUTHENTICATE rejected: TLS is not active", self.client.session_id)
            raise r.PrivacyRequired("AUTHENTICATE needs TLS first: use STARTTLS or port 993")
        if command.mechanism != "PLAIN":
            log.info("session %s: AUTHENTICATE rejected: mechanism %r", self.client.session_id, command.mechanism[:32])
            raise r.CommandFailed(f"unsupported SASL mechanism {command.mechanism[:32]}; use PLAIN", code=b"CANNOT")

    async def do_authenticate(self, command: c.Authenticate) -> bytes:
        # The connection reads a missing initial response and passes it in as ``initial_response``.
        self.check_authenticate(command)
        username, password = parse_plain(command.initial_response or b"")
        return await self.login(command.tag, username, password, command.name)

    async def login(self, tag: str, username: str, password: str, verb: str) -> bytes:
        if not self.tls_active:
            raise r.PrivacyRequired(f"{verb} needs TLS first: use STARTTLS or port 993")
        address = self.client.address
        if self.throttle.is_locked(address, username):
            log.warning("session %s: login for %r rejected: too many failures from %s", self.client.session_id, username[:100], address)
            await asyncio.sleep(self.throttle.delay)
            raise r.Unavailable("too many failed logins; try again later")
        account = await self.store.authenticate(username, password)
        if account is None:
            delay = self.throttle.record_failure(address, username)
            log.warning("session %s: login failed for %r from %s", self.client.session_id, username[:100], address)
            await asyncio.sleep(delay)
            raise r.AuthenticationFailed("invalid user name or password")
        self.throttle.record_success(address, account.address)
        self.account_id = account.id
        self.username = account.address
        self.state = State.AUTHENTICATED
        log.info("session %s: %s logged in from %s", self.client.session_id, account.address, address)
        return r.tagged(tag, b"OK", f"{verb} completed", self.capability_code())

    # Authenticated state ------------------------------------------------------------

    async def _mailbox(self, name: str, *, missing: type[r.CommandFailed] = r.Nonexistent):
        assert self.account_id is not None
        mailbox = await self.store.get_mailbox(self.account_id, name)
        if mailbox is None:
            raise missing(f"mailbox {name[:200]} does not exist")
        return mailbox

    async def do_select(self, command: c.Select | c.Examine) -> bytes:
        read_only = isinstance(command, c.Examine)
        if self.view is not None:
            self._deselect()
        mailbox = await self._mailbox(command.mailbox)
        self.hub.watch(mailbox.id, self.changed)
        try:
            mailbox_row, states = await self.store.message_states(mailbox.id)
        except NotFound:
            self.hub.unwatch(mailbox.id, self.changed)
            raise r.Nonexistent(f"mailbox {command.mailbox[:200]} does not exist") from None
        view = MailboxView(
            mailbox_row.id,
            mailbox_row.name,
            mailbox_row.uidvalidity,
            mailbox_row.uidnext,
            mailbox_row.highestmodseq,
            states,
            read_only=read_only,
        )
        self.view = view
        self.state = State.SELECTED
        self.checked_at = asyncio.get_running_loop().time()
        self.emit_flags()
        self.emit(b"* %d EXISTS\r\n* 0 RECENT\r\n" % view.exists)
        unseen = view.unseen_first()
        if unseen is not None:
            self.emit(r.untagged_status(b"OK", f"message {unseen} is the first unseen", b"UNSEEN %d" % unseen))
        self.emit(r.untagged_status(b"OK", "UIDs valid", b"UIDVALIDITY %d" % view.uidvalidity))
        self.emit(r.untagged_status(b"OK", "predicted next UID", b"UIDNEXT %d" % view.uidnext))
        code = b"READ-ONLY" if read_only else b"READ-WRITE"
        return self.ok(command, code=code)

    do_examine = do_select

    def _check_new_name(self, name: str) -> str:
        name = name.rstrip(DELIMITER) if name.endswith(DELIMITER) else name
        if not name:
            raise r.Cannot("a mailbox name must not be empty")
        if len(name) > MAX_MAILBOX_NAME:
            raise r.Cannot(f"mailbox names are limited to {MAX_MAILBOX_NAME} characters")
        if name.startswith(DELIMITER) or DELIMITER * 2 in name:
            raise r.Cannot("a mailbox name must not start with the delimiter / or contain an empty level")
        if any(char in name for char in "*%") or any(ord(char) < 0x20 or ord(char) == 0x7F for char in name):
            raise r.Cannot("a mailbox name must not contain *, % or control characters")
        return name

    async def _create_parents(self, name: str) -> None:
        """Create the missing parents of ``name``, so that the hierarchy has no holes (RFC 3501 CREATE)."""
        assert self.account_id is not None
        levels = name.split(DELIMITER)
        for depth in range(1, len(levels)):
            parent = DELIMITER.join(levels[:depth])
            if await self.store.get_mailbox(self.account_id, parent) is None:
                try:
                    await self.store.create_mailbox(self.account_id, parent)
                except AlreadyExists:
                    pass

    async def do_create(self, command: c.Create) -> bytes:
        assert self.account_id is not None
        name = self._check_new_name(command.mailbox)
        if name.upper() == INBOX:
            raise r.AlreadyExists("INBOX always exists")
        special_use = None
        if command.special_use:
            if len(command.special_use) > 1 or command.special_use[0] not in SPECIAL_USE_ATTRIBUTES:
                raise r.CommandFailed("unsupported special-use attribute", code=b"USEATTR")
            special_use = command.special_use[0]
        await self._create_parents(name)
        try:
            await self.store.create_mailbox(self.account_id, name, special_use=special_use)
        except AlreadyExists:
            raise r.AlreadyExists(f"mailbox {name[:200]} already exists") from None
        log.info("session %s: %s created mailbox %r", self.client.session_id, self.username, name)
        return self.ok(command)

    async def do_delete(self, command: c.Delete) -> bytes:
        assert self.account_id is not None
        mailbox = await self._mailbox(command.mailbox)
        if mailbox.name == INBOX or mailbox.name == OUTBOX or mailbox.special_use:
            raise r.Cannot(f"mailbox {mailbox.name[:200]} is a system mailbox and cannot be deleted")
        children = [m for m in await self.store.list_mailboxes(self.account_id) if m.name.startswith(mailbox.name + DELIMITER)]
        if children:
            raise r.Cannot(f"mailbox {mailbox.name[:200]} has child mailboxes; delete them first")
        if self.view is not None and self.view.mailbox_id == mailbox.id:
            self._deselect()
        try:
            await self.store.delete_mailbox(self.account_id, mailbox.name)
        except NotFound:
            raise r.Nonexistent(f"mailbox {mailbox.name[:200]} does not exist") from None
        except StoreError as exc:
            raise r.Cannot(str(exc)) from None
        log.info("session %s: %s deleted mailbox %r", self.client.session_id, self.username, mailbox.name)
        return self.ok(command)

    async def do_rename(self, command: c.Rename) -> bytes:
        assert self.account_id is not None
        source = await self._mailbox(command.old_name)
        new_name = self._check_new_name(command.new_name)
        if new_name.upper() == INBOX or await self.store.get_mailbox(self.account_id, new_name) is not None:
            raise r.AlreadyExists(f"mailbox {new_name[:200]} already exists")
        if source.name == OUTBOX:
            raise r.Cannot("the Outbox cannot be renamed: submission stores queued mail there")
        if new_name.startswith(source.name + DELIMITER):
            raise r.Cannot("a mailbox cannot be renamed into its own hierarchy")
        await self._create_parents(new_name)
        if source.name == INBOX:
            # RFC 3501: renaming INBOX moves its messages into the new mailbox and leaves INBOX empty.
            target = await self.store.create_mailbox(self.account_id, new_name)
            moved = await self.store.move_all_messages(source.id, target.id)
            log.info("session %s: INBOX renamed to %r, %d messages moved", self.client.session_id, new_name, moved)
            return self.ok(command)
        try:
            await self.store.rename_mailbox(self.account_id, source.name, new_name)
        except NotFound:
            raise r.Nonexistent(f"mailbox {source.name[:200]} does not exist") from None
        except AlreadyExists:
            raise r.AlreadyExists(f"mailbox {new_name[:200]} already exists") from None
        if self.view is not None and self.view.mailbox_id == source.id:
            # The selected mailbox got a new name and UIDVALIDITY: the session's view is stale.
            self._deselect()
            self.emit(r.untagged_status(b"OK", "the selected mailbox was renamed and is now closed", b"CLOSED"))
        log.info("session %s: %s renamed %r to %r", self.client.session_id, self.username, source.name, new_name)
        return self.ok(command)

    async def do_subscribe(self, command: c.Subscribe | c.Unsubscribe) -> bytes:
        assert self.account_id is not None
        try:
            await self.store.set_subscribed(self.account_id, command.mailbox, isinstance(command, c.Subscribe))
        except NotFound:
            raise r.Nonexistent(f"mailbox {command.mailbox[:200]} does not exist") from None
        return self.ok(command)

    do_unsubscribe = do_subscribe

    async def do_list(self, command: c.List | c.Lsub) -> bytes:
        assert self.account_id is not None
        lsub = isinstance(command, c.Lsub)
        patterns = (command.pattern,) if lsub else command.patterns
        selection = () if lsub else command.selection_options
        returns = () if lsub else command.return_options
        if not lsub and len(patterns) == 1 and patterns[0] == "" and not selection:
            # LIST "" "": the hierarchy delimiter and the root name (RFC 3501 section 6.3.8).
            self.emit(b'* LIST (\\Noselect) "/" ""\r\n')
            return self.ok(command)
        mailboxes = await self.store.list_mailboxes(self.account_id)
        names = {m.name for m in mailboxes}
        compiled = [mailbox_pattern(command.reference, pattern) for pattern in patterns]
        verb = b"LSUB" if lsub else b"LIST"
        subscribed_only = lsub or "SUBSCRIBED" in selection
        special_only = "SPECIAL-USE" in selection
        entries: list[tuple[str, object]] = [(m.name, m) for m in mailboxes]
        if not lsub and not selection:
            # A level that exists only as a parent of other mailboxes is listed as \Noselect.
            implied = {
                DELIMITER.join(name.split(DELIMITER)[:depth])
                for name in names
                for depth in range(1, name.count(DELIMITER) + 1)
            }
            entries += [(name, None) for name in implied - names]
        for name, mailbox in sorted(entries, key=lambda entry: (entry[0] != INBOX, entry[0])):
            if not any(p.match(name) for p in compiled):
                continue
            if mailbox is None:
                line = verb + b" (\\Noselect \\HasChildren) \"/\" " + r.mailbox(name)
                self.emit(r.untagged(line))
                continue
            if subscribed_only and not mailbox.subscribed:
                continue
            if special_only and not mailbox.special_use:
                continue
            attributes = []
            if not lsub:
                has_children = any(n.startswith(mailbox.name + DELIMITER) for n in names)
                attributes.append("\\HasChildren" if has_children else "\\HasNoChildren")
                if mailbox.special_use:
                    attributes.append(mailbox.special_use)
                if "SUBSCRIBED" in selection or "SUBSCRIBED" in returns:
                    if mailbox.subscribed:
                        attributes.append("\\Subscribed")
            line = verb + b" " + r.flag_list(attributes) + b' "/" ' + r.mailbox(mailbox.name)
            self.emit(r.untagged(line))
        return self.ok(command)

    do_lsub = do_list

    async def do_status(self, command: c.Status) -> bytes:
        mailbox = await self._mailbox(command.mailbox)
        status = await self.store.mailbox_status(mailbox.id)
        values = {
            c.StatusItem.MESSAGES: status.messages,
            c.StatusItem.RECENT: 0,
            c.StatusItem.UIDNEXT: status.uidnext,
            c.StatusItem.UIDVALIDITY: status.uidvalidity,
            c.StatusItem.UNSEEN: status.unseen,
            c.StatusItem.HIGHESTMODSEQ: status.highestmodseq,
            c.StatusItem.APPENDLIMIT: self.config.append_limit,
            c.StatusItem.SIZE: status.size,
        }
        items = b" ".join(item.value.encode("ascii") + b" %d" % values[item] for item in command.items)
        self.emit(r.untagged(b"STATUS " + r.mailbox(mailbox.name) + b" (" + items + b")"))
        return self.ok(command)

    async def do_append(self, command: c.Append) -> bytes:
        assert self.account_id is not None
        if canonical_name(command.mailbox) == OUTBOX:
            raise r.Cannot("APPEND to the Outbox is not allowed: it contains only mail submitted for relay over SMTP")
        if len(command.message) > self.config.append_limit:
            raise r.TooBig(f"message exceeds the APPEND limit of {self.config.append_limit} bytes")
        if not command.message:
            raise r.Cannot("an empty message cannot be appended")
        check_system_flags(command.flags)
        flags, keywords = split_flags(command.flags)
        if keywords:
            mailbox = await self.store.get_mailbox(self.account_id, command.mailbox)
            if mailbox is None:
                raise r.TryCreate(f"mailbox {command.mailbox[:200]} does not exist")
            await self._check_keyword_limits(mailbox.id, keywords, set())
        try:
            appended = await self.store.append_to(
                self.account_id,
                command.mailbox,
                command.message,
                flags=flags,
                keywords=keywords,
                internal_date=command.internal_date,
            )
        except NotFound:
            raise r.TryCreate(f"mailbox {command.mailbox[:200]} does not exist") from None
        log.info(
            "session %s: appended %d bytes to %r as UID %d",
            self.client.session_id, len(command.message), command.mailbox, appended.uid,
        )
        return self.ok(command, code=b"APPENDUID %d %d" % (appended.uidvalidity, appended.uid))

    async def do_namespace(self, command: c.Namespace) -> bytes:
        self.emit(b'* NAMESPACE (("" "/")) NIL NIL\r\n')
        return self.ok(command)

    async def do_enable(self, command: c.Enable) -> bytes:
        # No ENABLE-able extension is announced yet, so none is enabled (RFC 5161 allows this).
        self.emit(b"* ENABLED\r\n")
        return self.ok(command)

    # Selected state -----------------------------------------------------------------

    def _view(self) -> MailboxView:
        assert self.view is not None
        return self.view

    def _require_writable(self, what: str) -> MailboxView:
        view = self._view()
        if view.read_only:
            raise r.ReadOnly(f"{what} is not allowed: the mailbox was opened with EXAMINE")
        return view

    def resolve(self, sequence_set, uid: bool) -> list[int]:
        """Return the UIDs a sequence set names in the session's view."""
        view = self._view()
        if uid:
            return [u for u in sequence_set.resolve_uids(view.uids)]
        return [view.uids[n - 1] for n in sequence_set.resolve(view.exists)]

    async def do_check(self, command: c.Check) -> bytes:
        return self.ok(command)

    async def do_close(self, command: c.Close) -> bytes:
        view = self._view()
        if not view.read_only:
            expunged = await self.store.expunge(view.mailbox_id)
            if expunged:
                log.info("session %s: CLOSE expunged %d messages", self.client.session_id, len(expunged))
        self._deselect()
        return self.ok(command)

    async def do_unselect(self, command: c.Unselect) -> bytes:
        self._deselect()
        return self.ok(command)

    async def do_expunge(self, command: c.Expunge) -> bytes:
        view = self._require_writable("EXPUNGE")
        uids = None
        if command.uid_set is not None:
            uids = command.uid_set.resolve_uids(view.uids)
            if not uids:
                return self.ok(command)
        expunged = await self.store.expunge(view.mailbox_id, uids)
        for sequence_number in view.remove_own_expunges(expunged):
            self.emit(b"* %d EXPUNGE\r\n" % sequence_number)
        if expunged:
            log.info("session %s: expunged %d messages from %r", self.client.session_id, len(expunged), view.name)
        return self.ok(command)

    async def do_search(self, command: c.Search) -> bytes:
        view = self._view()
        if command.charset is not None and command.charset.upper() not in ("UTF-8", "US-ASCII"):
            raise r.BadCharset(f"charset {command.charset[:40]} is not supported")
        key_count = count_keys(command.key)
        if key_count > MAX_SEARCH_KEYS:
            log.info("session %s: SEARCH with %d keys rejected", self.client.session_id, key_count)
            raise r.BadCommand(f"SEARCH has {key_count} search keys; at most {MAX_SEARCH_KEYS} are allowed")
        if not command.uid:
            # Changes from others may add messages, but not remove them, before a plain SEARCH.
            await self.sync(allow_expunge=False)
        uids = await search(self.store, view, command.key)
        numbers = uids if command.uid else view.sequences_of(uids)
        line = b"SEARCH" + b"".join(b" %d" % n for n in numbers)
        self.emit(r.untagged(line))
        return self.ok(command)

    async def do_fetch(self, command: c.Fetch) -> bytes:
        view = self._view()
        if command.changed_since is not None:
            raise r.BadCommand("CHANGEDSINCE needs CONDSTORE, which this server does not announce")
        uids = self.resolve(command.sequence_set, command.uid)
        uids = [uid for uid in uids if view.live(uid)]
        if not uids:
            return self.ok(command)
        renderer = FetchRenderer(command.attributes, include_uid=command.uid)
        seen_changes: dict[int, MessageState] = {}
        if renderer.sets_seen and not view.read_only:
            # One transaction sets \Seen on every message of the command before any is sent.
            unseen = [uid for uid in uids if not view.states[uid].flags & Flag.SEEN]
            if unseen:
                changed = await self.store.store_flags(view.mailbox_id, unseen, FlagMode.ADD, int(Flag.SEEN))
                view.record_own_changes(changed)
                seen_changes = {state.uid: state for state in changed}
        for batch in await self._fetch_batches(view, uids, renderer.needs_content):
            messages = await self.store.fetch_messages(
                view.mailbox_id, batch, content=renderer.needs_content, details=renderer.needs_details
            )
            for message in messages:
                sequence_number = view.sequence_of(message.uid)
                if sequence_number is not None:
                    self.emit(renderer.render(sequence_number, message, seen_changes.get(message.uid)))
            await self._drain()
        return self.ok(command)

    async def _fetch_batches(self, view: MailboxView, uids: list[int], content: bool) -> list[list[int]]:
        """Split UIDs into batches whose content fits in memory: FETCH_BATCH messages or FETCH_BATCH_BYTES.

        Without content one batch is enough. With content, the sizes are read
        first, so a FETCH of many large messages never holds more than about
        FETCH_BATCH_BYTES of them (or one message, when it alone is larger).
        """
        if not content:
            return [uids]
        sizes = {m.uid: m.size or 0 for m in await self.store.fetch_messages(view.mailbox_id, uids)}
        batches: list[list[int]] = [[]]
        total = 0
        for uid in uids:
            size = sizes.get(uid, 0)
            if batches[-1] and (len(batches[-1]) >= FETCH_BATCH or total + size > FETCH_BATCH_BYTES):
                batches.append([])
                total = 0
            batches[-1].append(uid)
            total += size
        return batches

    async def do_store(self, command: c.Store) -> bytes:
        view = self._require_writable("STORE")
        if command.unchanged_since is not None:
            raise r.BadCommand("UNCHANGEDSINCE needs CONDSTORE, which this server does not announce")
        check_system_flags(command.flags)
        uids = [uid for uid in self.resolve(command.sequence_set, command.uid) if view.live(uid)]
        if not uids:
            return self.ok(command)
        flags, keywords = split_flags(command.flags)
        if keywords and command.action is not c.StoreAction.REMOVE:
            await self._check_keyword_limits(view.mailbox_id, keywords, view.keywords)
        mode = {
            c.StoreAction.REPLACE: FlagMode.REPLACE,
            c.StoreAction.ADD: FlagMode.ADD,
            c.StoreAction.REMOVE: FlagMode.REMOVE,
        }[command.action]
        changed = await self.store.store_flags(view.mailbox_id, uids, mode, flags, keywords)
        if view.record_own_changes(changed):
            self.emit_flags()
        if not command.silent:
            for uid in uids:
                sequence_number = view.sequence_of(uid)
                state = view.states.get(uid)
                if sequence_number is None or state is None:
                    continue
                items = [encoded_flags(state.flags, state.keywords)]
                if command.uid:
                    items.append(b"UID %d" % uid)
                self.emit(r.fetch_response(sequence_number, items))
        return self.ok(command)

    async def _check_keyword_limits(self, mailbox_id: int, keywords: list[str], known: set[str]) -> None:
        """Raise NO [LIMIT] when a keyword is too long or the mailbox would get too many keywords.

        ``known`` are keywords the mailbox is known to have; the store is read only
        when some keyword is not among them.
        """
        for keyword in keywords:
            if len(keyword) > MAX_KEYWORD_LENGTH:
                raise r.Limit(f"keyword {keyword[:40]}... is longer than {MAX_KEYWORD_LENGTH} characters")
        known_lower = {k.lower() for k in known}
        new = {k.lower() for k in keywords} - known_lower
        if not new:
            return
        # NOTE: two sessions adding keywords at the same time can each pass this check,
        # and COPY and MOVE skip it, so a mailbox can still exceed MAX_KEYWORDS.
        present = {k.lower() for k in await self.store.mailbox_keywords(mailbox_id)}
        total = len(present | new)
        if total > MAX_KEYWORDS:
            log.info("session %s: keywords rejected: mailbox %d would have %d", self.client.session_id, mailbox_id, total)
            raise r.Limit(f"a mailbox may have at most {MAX_KEYWORDS} distinct keywords; this would make {total}")

    async def _target(self, name: str):
        mailbox = await self._mailbox(name, missing=r.TryCreate)
        if mailbox.name == OUTBOX:
            raise r.Cannot("messages cannot be copied or moved into the Outbox; send mail through SMTP submission")
        return mailbox

    async def do_copy(self, command: c.Copy) -> bytes:
        view = self._view()
        target = await self._target(command.mailbox)
        uids = [uid for uid in self.resolve(command.sequence_set, command.uid) if view.live(uid)]
        if not uids:
            return self.ok(command)
        result = await self.store.copy_messages(view.mailbox_id, target.id, uids)
        if not result.source_uids:
            return self.ok(command)
        code = b"COPYUID %d %s %s" % (
            result.uidvalidity,
            uid_set_text(result.source_uids).encode("ascii"),
            uid_set_text(result.target_uids).encode("ascii"),
        )
        return self.ok(command, code=code)

    async def do_move(self, command: c.Move) -> bytes:
        view = self._require_writable("MOVE")
        target = await self._target(command.mailbox)
        if target.id == view.mailbox_id:
            raise r.Cannot("source and target mailbox are the same")
        uids = [uid for uid in self.resolve(command.sequence_set, command.uid) if view.live(uid)]
        if not uids:
            return self.ok(command)
        result = await self.store.move_messages(view.mailbox_id, target.id, uids)
        if result.source_uids:
            code = b"COPYUID %d %s %s" % (
                result.uidvalidity,
                uid_set_text(result.source_uids).encode("ascii"),
                uid_set_text(result.target_uids).encode("ascii"),
            )
            self.emit(r.untagged_status(b"OK", "moved", code))
        for sequence_number in view.remove_own_expunges(result.source_uids):
            self.emit(b"* %d EXPUNGE\r\n" % sequence_number)
        log.info(
            "session %s: moved %d messages from %r to %r",
            self.client.session_id, len(result.source_uids), view.name, target.name,
        )
        return self.ok(command)


def check_system_flags(names: tuple[str, ...] | list[str]) -> None:
    """Raise for flags that cannot be stored: BAD for an unknown system flag, NO [CANNOT] for \\Recent."""
    for name in names:
        if not name.startswith("\\") or name.lower() in SYSTEM_FLAGS_LOWER:
            continue
        if name.lower() == "\\recent":
            raise r.Cannot("\\Recent is set by the server and cannot be stored")
        raise r.BadCommand(f"unknown system flag {name[:40]}; the system flags are {' '.join(SYSTEM_FLAG_LIST)}")


def uid_set_text(uids: list[int]) -> str:
    """Return UIDs in the order given as a compact set, keeping pairs aligned for COPYUID."""
    parts: list[str] = []
    start = previous = None
    for uid in uids:
        if start is None:
            start = previous = uid
        elif uid == previous + 1:
            previous = uid
        else:
            parts.append(str(start) if start == previous else f"{start}:{previous}")
            start = previous = uid
    if start is not None:
        parts.append(str(start) if start == previous else f"{start}:{previous}")
    return ",".join(parts)


def parse_plain(data: bytes) -> tuple[str, str]:
    """Split a SASL PLAIN message (RFC 4616) into user name and password."""
    pieces = data.split(b"\x00")
    if len(pieces) != 3:
        raise r.BadCommand("invalid SASL PLAIN response: expected authzid NUL authcid NUL password")
    authzid, authcid, password = pieces
    try:
        username = authcid.decode("utf-8")
        secret = password.decode("utf-8")
        authorize_as = authzid.decode("utf-8")
    except UnicodeDecodeError:
        raise r.BadCommand("invalid SASL PLAIN response: not UTF-8") from None
    if authorize_as and authorize_as.lower() != username.lower():
        raise r.AuthorizationFailed("logging in as another user is not allowed")
    return username, secret


HANDLERS = {
    c.Capability: Session.do_capability,
    c.Noop: Session.do_noop,
    c.Logout: Session.do_logout,
    c.Id: Session.do_id,
    c.Login: Session.do_login,
    c.Authenticate: Session.do_authenticate,
    c.Select: Session.do_select,
    c.Examine: Session.do_examine,
    c.Create: Session.do_create,
    c.Delete: Session.do_delete,
    c.Rename: Session.do_rename,
    c.Subscribe: Session.do_subscribe,
    c.Unsubscribe: Session.do_unsubscribe,
    c.List: Session.do_list,
    c.Lsub: Session.do_lsub,
    c.Status: Session.do_status,
    c.Append: Session.do_append,
    c.Namespace: Session.do_namespace,
    c.Enable: Session.do_enable,
    c.Check: Session.do_check,
    c.Close: Session.do_close,
    c.Unselect: Session.do_unselect,
    c.Expunge: Session.do_expunge,
    c.Search: Session.do_search,
    c.Fetch: Session.do_fetch,
    c.Store: Session.do_store,
    c.Copy: Session.do_copy,
    c.Move: Session.do_move,
}
