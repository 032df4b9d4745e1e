"""`mailstack demo`: a Blue Book and two mail servers, here.test and there.test, on one machine.

The package lays out the world (:mod:`.plan`), provisions and starts it through
the ordinary CLI commands (:mod:`.world`, :mod:`.processes`), probes each
listener by its protocol (:mod:`.probe`), prints how to connect real clients
(:mod:`.instructions`) and, with ``--check``, sends mail through it (:mod:`.check`).
"""

from mailstack.demo.cli import demo

__all__ = ["demo"]
