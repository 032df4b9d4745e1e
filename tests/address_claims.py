"""Loopback address claims shared by the tests that run whole demo worlds.

A lock file per (Blue Book, here.test, there.test) address triple keeps
concurrent test runs on one machine apart even before their servers bind.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from pathlib import Path


def claim_addresses(candidates: list[tuple[str, str, str]], ports: tuple[int, int]) -> tuple[tuple[str, str, str], int]:
    """Claim the first free (Blue Book, here.test, there.test) triple; return it with the lock's descriptor.

    A lock file per triple keeps concurrent test runs on this machine apart even
    before their servers bind. The bind checks skip triples that another
    process already uses. ``ports`` are the Blue Book's UDP port and the mail servers' SMTP port.
    Closing the descriptor releases the claim.
    """
    for triple in candidates:
        lock_path = Path(tempfile.gettempdir()) / f"mailstack-test-{triple[0]}.lock"
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            wanted = [(triple[0], ports[0], socket.SOCK_DGRAM)]
            wanted += [(address, ports[1], socket.SOCK_STREAM) for address in triple[1:]]
            for address, port, kind in wanted:
                with socket.socket(socket.AF_INET, kind) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind((address, port))
        except OSError:
            os.close(descriptor)
            continue
        return triple, descriptor
    raise AssertionError(f"every candidate address triple is busy: {candidates}")
