"""`mailstack demo`: a Blue Book and two mail servers, here.test and there.test, on one machine.

The package lays out the world (:mod:`.plan`), provisions and starts it through
the ordinary CLI commands (:mod:`.world`, :mod:`.processes`), probes each
listener by its protocol (:mod:`.probe`), prints how to connect real clients
(:mod:`.instructions`) and, with ``--check``, sends mail through it (:mod:`.check`).
"""

from typing import Any

__all__ = ["demo"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `python -m mailstack.demo.probe` (the Docker
    # healthcheck) loads neither click nor the rest of the demo.
    if name == "demo":
        from mailstack.demo.cli import demo

        return demo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
