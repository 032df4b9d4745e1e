"""The store Protocols describe the SQL store exactly."""

from __future__ import annotations

import inspect

import pytest

from mailstack.store import Store
from mailstack.store import interface

PROTOCOLS = [
    interface.AccountStore,
    interface.MailboxStore,
    interface.DeliveryStore,
    interface.MessageStore,
    interface.QueueStore,
    interface.MailStore,
]


def protocol_methods(protocol: type) -> list[str]:
    return [
        name
        for name, value in vars(protocol).items()
        if callable(value) and not name.startswith("_")
    ]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=lambda p: p.__name__)
def test_store_matches_protocol_signatures(protocol):
    for name in protocol_methods(protocol):
        declared = inspect.signature(getattr(protocol, name))
        implemented = inspect.signature(getattr(Store, name))
        assert list(declared.parameters) == list(implemented.parameters), name
        for parameter in declared.parameters.values():
            actual = implemented.parameters[parameter.name]
            assert actual.kind == parameter.kind, f"{name}({parameter.name})"
            assert actual.default == parameter.default, f"{name}({parameter.name})"
        assert inspect.iscoroutinefunction(getattr(protocol, name)) == inspect.iscoroutinefunction(
            getattr(Store, name)
        ), name


def test_every_public_store_method_is_declared():
    declared = {name for protocol in PROTOCOLS for name in protocol_methods(protocol)}
    public = {
        name
        for name, value in inspect.getmembers(Store, inspect.iscoroutinefunction)
        if not name.startswith("_") and name not in {"open", "read", "write"}
    }
    assert public - declared == set()


async def test_open_store_is_a_mail_store(tmp_path):
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'mail.db'}")
    try:
        assert isinstance(store, interface.MailStore)
    finally:
        await store.close()
