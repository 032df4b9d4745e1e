"""The relay queue runner: claim due deliveries, send them, record the outcome.

The runner claims due rows with a lease, groups them by message and
destination domain, and sends each group in one SMTP transaction. Each
recipient then ends as delivered (2xx), bounced (5xx, or past the maximum
queue lifetime) or deferred (everything else) with exponential backoff.
Bounces and the optional delay warning become delivery status notifications
in the sender's INBOX, stored in the same transaction as the new states.

All timing decisions (due, backoff, lifetime, lease) use the store's clock,
so a test with a fake clock can run days of retries in a moment. Only the
wait between scans is real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from mailstack.store import NotFound, Store
from mailstack.store.models import DeliveryState
from mailstack.store.queue import AttemptResult, ClaimedDelivery, Notice
from mailstack.transfer.client import ClientSettings, Reply, Sender, local_failure
from mailstack.transfer.dsn import RecipientStatus, build_dsn
from mailstack.transfer.resolver import DNSFailure, MailHost, MXResolver

log = logging.getLogger(__name__)

# Rows claimed per scan; more are claimed at once when these are done.
CLAIM_BATCH = 200


@dataclass(frozen=True)
class RetryPolicy:
    """When to retry a deferred delivery and when to give up, in seconds."""

    initial: float = 300.0
    maximum: float = 4000.0
    lifetime: float = 5 * 24 * 3600.0
    delay_warning: float = 0.0  # 0 disables delay warnings

    def delay(self, attempts: int) -> dt.timedelta:
        """Return the wait after the ``attempts``-th failed attempt: initial, doubling, capped."""
        seconds = self.initial * (2 ** max(attempts - 1, 0))
        return dt.timedelta(seconds=min(seconds, self.maximum))


def _worker_id() -> str:
    return f"{socket.gethostname()[:32]}:{os.getpid()}:{secrets.token_hex(3)}"


class QueueRunner:
    """Relay the outbound queue of one store.

    ``start`` runs the scan loop in a task; ``run_once`` processes what is due
    now and returns when it is done, for tests and ``queue flush``.
    """

    def __init__(
        self,
        store: Store,
        *,
        resolver: MXResolver,
        sender: Sender,
        reporting_mta: str,
        retry: RetryPolicy = RetryPolicy(),
        lease_time: float = 600.0,
        scan_interval: float = 5.0,
        max_connections: int = 20,
        max_connections_per_domain: int = 4,
        clock: Callable[[], dt.datetime] | None = None,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.resolver = resolver
        self.sender = sender
        self.reporting_mta = reporting_mta
        self.retry = retry
        self.lease_time = lease_time
        self.scan_interval = scan_interval
        self.clock = clock or store.clock
        self.owner = owner or _worker_id()
        self._connections = asyncio.Semaphore(max_connections)
        # Groups claimed but not finished, at most; a lease must not run out while
        # its group waits for a connection slot.
        self._max_in_flight = 2 * max_connections
        self._per_domain_limit = max_connections_per_domain
        # Per destination domain: its semaphore and how many groups use it, so the
        # entry goes away with the domain's last group.
        self._per_domain: dict[str, tuple[asyncio.Semaphore, int]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._groups: set[asyncio.Task] = set()
        self._remove_listener: Callable[[], None] | None = None
        self._stopping = False
        # Outcomes waiting to be written; one task writes all that are waiting in
        # one transaction, so concurrent groups do not queue for SQLite's write lock.
        self._pending: list[tuple[list[AttemptResult], list[Notice], asyncio.Future]] = []
        self._writer: asyncio.Task | None = None

    # Lifecycle -------------------------------------------------------------

    def wake(self) -> None:
        """Make the loop scan now; safe to call from store listeners."""
        self._wake.set()

    def start(self) -> None:
        self._remove_listener = self.store.add_queue_listener(self.wake)
        self._task = asyncio.create_task(self._loop(), name=f"queue-runner-{self.owner}")
        log.info("queue runner %s started (scan every %.1f s)", self.owner, self.scan_interval)

    async def stop(self, timeout: float) -> None:
        """Stop claiming, let running groups finish within ``timeout``, then give back the leases."""
        self._stopping = True
        if self._remove_listener is not None:
            self._remove_listener()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._groups:
            done, pending = await asyncio.wait(self._groups, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
                log.warning("queue runner %s cancelled %d delivery attempt(s) at shutdown", self.owner, len(pending))
        if self._writer is not None:
            # Outcomes already queued are written before the leases are given back.
            await asyncio.wait([self._writer])
        await self.sender.close()
        released = await self.store.release_leases(self.owner)
        log.info("queue runner %s stopped; %d lease(s) given back", self.owner, released)

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                await self._scan(wait=False)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("queue scan by %s failed; retrying after the scan interval", self.owner)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.scan_interval)
            except TimeoutError:
                pass

    async def run_once(self) -> int:
        """Process every delivery due now, wait for the attempts, and return how many there were."""
        return await self._scan(wait=True)

    async def _scan(self, *, wait: bool) -> int:
        total = 0
        while not self._stopping:
            if not wait and len(self._groups) >= self._max_in_flight:
                # A finishing group wakes the loop, which then claims more.
                break
            # Each claimed row makes at most one group, so the in-flight bound holds.
            limit = CLAIM_BATCH if wait else min(CLAIM_BATCH, self._max_in_flight - len(self._groups))
            claimed = await self.store.claim_due(self.owner, self.lease_time, limit=limit)
            if not claimed:
                break
            total += len(claimed)
            tasks = [self._spawn(group) for group in _group(claimed)]
            if wait:
                await asyncio.gather(*tasks)
            if len(claimed) < limit:
                break
        return total

    def _spawn(self, group: list[ClaimedDelivery]) -> asyncio.Task:
        task = asyncio.create_task(self._attempt_guarded(group))
        self._groups.add(task)
        task.add_done_callback(self._group_done)
        return task

    def _group_done(self, task: asyncio.Task) -> None:
        self._groups.discard(task)
        # Claim again once half the slots are free, so claims come in batches.
        if len(self._groups) == self._max_in_flight // 2:
            self.wake()

    # One attempt ------------------------------------------------------------

    async def _attempt_guarded(self, group: list[ClaimedDelivery]) -> None:
        first = group[0]
        heartbeat = asyncio.create_task(self._keep_leases([delivery.id for delivery in group]))
        try:
            async with self._connections, self._domain_slot(first.domain):
                await self._attempt(group)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The lease runs out and another scan retries the group.
            log.exception(
                "delivery attempt of %s to %s failed unexpectedly; it will be retried after its lease",
                first.queue_id,
                first.domain,
            )
        finally:
            heartbeat.cancel()

    @contextlib.asynccontextmanager
    async def _domain_slot(self, domain: str) -> AsyncIterator[None]:
        """Hold one of the ``max_connections_per_domain`` slots of ``domain``."""
        semaphore, users = self._per_domain.get(domain, (None, 0))
        if semaphore is None:
            semaphore = asyncio.Semaphore(self._per_domain_limit)
        self._per_domain[domain] = (semaphore, users + 1)
        try:
            async with semaphore:
                yield
        finally:
            semaphore, users = self._per_domain[domain]
            if users <= 1:
                del self._per_domain[domain]
            else:
                self._per_domain[domain] = (semaphore, users - 1)

    async def _keep_leases(self, delivery_ids: list[int]) -> None:
        """Renew the group's leases every third of the lease time while its attempt runs.

        A group may wait for a connection slot and then talk to a slow peer for
        longer than one lease. Without renewal, another worker would then start
        the same recipients again.
        """
        interval = self.lease_time / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.store.renew_leases(self.owner, delivery_ids, self.lease_time)
            except Exception:
                log.exception("renewing the leases of deliveries %s failed; retrying", delivery_ids[:5])

    async def _attempt(self, group: list[ClaimedDelivery]) -> None:
        first = group[0]
        log_id = f"{first.queue_id}/{first.domain}"
        recipients = [delivery.recipient for delivery in group]
        log.info("%s: attempt for %d recipient(s), sender <%s>", log_id, len(group), first.envelope_sender)
        try:
            data = await self.store.load_queued_content(first.queue_id)
        except NotFound:
            # Deleted by an operator or cancelled over IMAP after the claim.
            log.info("%s: the message left the queue before its attempt", log_id)
            return

        try:
            hosts = self._without_self(await self.resolver.resolve(first.domain))
        except DNSFailure as exc:
            log.info("%s: DNS: %s (%s)", log_id, exc.text, exc.status)
            failure = local_failure(exc.status, exc.text)
            replies = {recipient: failure for recipient in recipients}
        else:
            if hosts:
                replies = await self.sender.send(hosts, first.envelope_sender, recipients, data, log_id=log_id)
            else:
                log.warning("%s: the best MX host of %s is this server", log_id, first.domain)
                failure = local_failure("5.4.6", f"mail for {first.domain} loops back to myself")
                replies = {recipient: failure for recipient in recipients}

        now = self.clock()
        results, bounced, deferred = self._classify(group, replies, now)
        notices = self._notices(group, data, bounced, deferred, now)
        finished = await self._record(results, notices)
        for result, delivery in zip(results, group):
            log.info(
                "%s: <%s> %s: %s",
                log_id,
                delivery.recipient,
                result.state.value,
                result.reply,
            )
        if first.queue_id in finished:
            log.info("%s: every recipient is final; the message left the queue", first.queue_id)

    async def _record(self, results: list[AttemptResult], notices: list[Notice]) -> list[str]:
        """Queue an attempt's outcome for the next group commit and return the queue ids that ended."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((results, notices, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())
        # Shielded: a group cancelled at shutdown must not lose an outcome already queued.
        return await asyncio.shield(future)

    async def _write_pending(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            results = [result for entry in batch for result in entry[0]]
            notices = [notice for entry in batch for notice in entry[1]]
            try:
                finished = await self.store.record_attempts(self.owner, results, notices=notices)
            except Exception as exc:
                for _results, _notices, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for _results, _notices, future in batch:
                if not future.done():
                    future.set_result(finished)

    def _without_self(self, hosts: list[MailHost]) -> list[MailHost]:
        """Drop this server and every less preferred host from an MX list (RFC 5321 section 5.1)."""
        own = self.reporting_mta.lower().rstrip(".")
        for host in hosts:
            if host.name == own:
                return [h for h in hosts if h.preference < host.preference]
        return hosts

    def _classify(
        self, group: Sequence[ClaimedDelivery], replies: dict[str, Reply], now: dt.datetime
    ) -> tuple[list[AttemptResult], list[tuple[ClaimedDelivery, Reply]], list[tuple[ClaimedDelivery, Reply]]]:
        results: list[AttemptResult] = []
        bounced: list[tuple[ClaimedDelivery, Reply]] = []
        deferred: list[tuple[ClaimedDelivery, Reply]] = []
        lifetime_end = dt.timedelta(seconds=self.retry.lifetime)
        for delivery in group:
            reply = replies.get(delivery.recipient) or local_failure("4.3.0", "no reply recorded")
            line = reply.describe()
            if reply.delivered:
                results.append(AttemptResult(delivery.id, DeliveryState.DELIVERED, line))
            elif reply.permanent:
                results.append(AttemptResult(delivery.id, DeliveryState.BOUNCED, line))
                bounced.append((delivery, reply))
            elif now - delivery.queued_at >= lifetime_end:
                expired = Reply(
                    reply.code,
                    "4.4.7" if reply.status == "4.0.0" else reply.status,
                    f"{reply.text} (delivery time expired)",
                    reply.remote_host,
                    reply.in_reply_to,
                )
                results.append(AttemptResult(delivery.id, DeliveryState.BOUNCED, expired.describe()))
                bounced.append((delivery, expired))
            else:
                next_attempt = now + self.retry.delay(delivery.attempts + 1)
                results.append(AttemptResult(delivery.id, DeliveryState.DEFERRED, line, next_attempt))
                deferred.append((delivery, reply))
        return results, bounced, deferred

    def _notices(
        self,
        group: Sequence[ClaimedDelivery],
        data: bytes,
        bounced: list[tuple[ClaimedDelivery, Reply]],
        deferred: list[tuple[ClaimedDelivery, Reply]],
        now: dt.datetime,
    ) -> list[Notice]:
        first = group[0]
        if not first.envelope_sender:
            # A message with the null sender is itself a notification, so no notice is sent about it.
            if bounced:
                log.info("%s: %d recipient(s) bounced; no notice for the null sender", first.queue_id, len(bounced))
            return []
        notices = []
        if bounced:
            notices.append(Notice(first.queue_id, self._dsn("failed", first, data, bounced, now)))
        warn_after = self.retry.delay_warning
        if (
            deferred
            and warn_after > 0
            and not first.delay_warned
            and now - first.queued_at >= dt.timedelta(seconds=warn_after)
        ):
            until = first.queued_at + dt.timedelta(seconds=self.retry.lifetime)
            notices.append(
                Notice(first.queue_id, self._dsn("delayed", first, data, deferred, now, until), delay=True)
            )
        return notices

    def _dsn(
        self,
        action: str,
        first: ClaimedDelivery,
        data: bytes,
        entries: list[tuple[ClaimedDelivery, Reply]],
        now: dt.datetime,
        until: dt.datetime | None = None,
    ) -> bytes:
        return build_dsn(
            action=action,  # type: ignore[arg-type]
            reporting_mta=self.reporting_mta,
            envelope_sender=first.envelope_sender,
            queue_id=first.queue_id,
            arrival=first.queued_at,
            original=data,
            recipients=[
                RecipientStatus(
                    recipient=delivery.recipient,
                    status=reply.status,
                    diagnostic=f"{reply.code} {reply.text}" if reply.code else reply.text,
                    remote_mta=reply.remote_host.split("[")[0] if reply.remote_host else None,
                    smtp_reply=bool(reply.code),
                    description=reply.describe(),
                )
                for delivery, reply in entries
            ],
            now=now,
            will_retry_until=until,
        )


def _group(claimed: Sequence[ClaimedDelivery]) -> list[list[ClaimedDelivery]]:
    """Group claimed rows by message and destination domain: one transaction each."""
    groups: dict[tuple[str, str], list[ClaimedDelivery]] = {}
    for delivery in claimed:
        groups.setdefault((delivery.queue_id, delivery.domain), []).append(delivery)
    return list(groups.values())


def settings_from_config(config) -> tuple[ClientSettings, RetryPolicy]:
    """Build the client settings and retry policy from a MailServerConfig."""
    section = config.transfer
    ca_file = section.tls_ca_file if str(section.tls_ca_file) not in ("", ".") else None
    client = ClientSettings(
        local_hostname=config.server.hostname,
        port=section.peer_port,
        tls_policy=section.tls_policy,
        tls_ca_file=ca_file,
        connect_timeout=section.connect_timeout,
        command_timeout=section.command_timeout,
        source_addresses=config.server.listen,
    )
    retry = RetryPolicy(
        initial=section.retry_initial,
        maximum=section.retry_max,
        lifetime=section.max_queue_lifetime,
        delay_warning=section.delay_warning,
    )
    return client, retry
