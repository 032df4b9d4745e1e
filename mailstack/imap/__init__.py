"""IMAP4rev1 mailbox access (RFC 3501): pure parser and encoder, session, asyncio server."""
