"""Rendering of FETCH responses for one command: the requested items of each message, in order.

Body sections, ENVELOPE and BODYSTRUCTURE come from ``mime``, which works on the
bytes exactly as they were stored. A message's MIME tree is parsed at most
once per message and only when an item needs it.
"""

from __future__ import annotations

from collections.abc import Sequence

from mailstack.imap import commands as c
from mailstack.imap import mime
from mailstack.imap import response as r
from mailstack.imap.view import encoded_flags
from mailstack.store.messages import MessageInfo, MessageState


class FetchRenderer:
    """Renders the requested items of one FETCH command for each message."""

    def __init__(self, attributes: Sequence[c.FetchAttribute], *, include_uid: bool) -> None:
        self.attributes = [a for a in attributes if a.item is not c.FetchItem.UID]
        # UID FETCH always returns UID (RFC 3501 section 6.4.8); it goes first, as common servers send it.
        self.include_uid = include_uid or any(a.item is c.FetchItem.UID for a in attributes)
        self.needs_content = any(a.needs_content for a in attributes)
        self.sets_seen = any(a.sets_seen for a in attributes)
        self.wants_flags = any(a.item is c.FetchItem.FLAGS for a in attributes)
        self.needs_details = self.needs_content or any(
            a.item in (c.FetchItem.INTERNALDATE, c.FetchItem.RFC822_SIZE) for a in attributes
        )

    def render(self, sequence_number: int, message: MessageInfo, seen_change: MessageState | None) -> bytes:
        """Return the ``* n FETCH (...)`` response; ``seen_change`` is the state after \\Seen was set."""
        items: list[bytes] = []
        if self.include_uid:
            items.append(b"UID %d" % message.uid)
        flags, keywords = message.flags, message.keywords
        if seen_change is not None:
            flags, keywords = seen_change.flags, seen_change.keywords
        data = message.data or b""
        tree: mime.MimePart | None = None
        for attribute in self.attributes:
            item = attribute.item
            if item is c.FetchItem.FLAGS:
                items.append(encoded_flags(flags, tuple(keywords)))
            elif item is c.FetchItem.INTERNALDATE:
                items.append(b"INTERNALDATE " + r.date_time(message.internal_date))
            elif item is c.FetchItem.RFC822_SIZE:
                items.append(b"RFC822.SIZE %d" % message.size)
            elif item is c.FetchItem.MODSEQ:
                items.append(b"MODSEQ (%d)" % message.modseq)
            elif item is c.FetchItem.BODY and attribute.section is not None:
                if tree is None and attribute.section.part:
                    tree = mime.parse(data)
                value = mime.fetch_section(data, attribute.section, tree)
                value = mime.partial(value, attribute.partial)
                items.append(attribute.response_name + b" " + mime.section_value(value))
            elif item is c.FetchItem.RFC822:
                items.append(b"RFC822 " + r.literal(data))
            elif item is c.FetchItem.RFC822_HEADER:
                items.append(b"RFC822.HEADER " + r.literal(mime.split_header(data)[0]))
            elif item is c.FetchItem.RFC822_TEXT:
                items.append(b"RFC822.TEXT " + r.literal(mime.split_header(data)[1]))
            else:
                if tree is None:
                    tree = mime.parse(data)
                if item is c.FetchItem.ENVELOPE:
                    items.append(b"ENVELOPE " + mime.envelope(tree))
                elif item is c.FetchItem.BODYSTRUCTURE:
                    items.append(b"BODYSTRUCTURE " + mime.body_structure(tree, extensible=True))
                elif item is c.FetchItem.BODY:
                    items.append(b"BODY " + mime.body_structure(tree, extensible=False))
        if seen_change is not None and not self.wants_flags:
            # \Seen was set as a side effect, so the client must learn the new flags (RFC 3501 section 6.4.5).
            items.append(encoded_flags(flags, tuple(keywords)))
        return r.fetch_response(sequence_number, items)
