"""The Blue Book: the authoritative DNS server that lets mail servers find each other.

``zonestore`` keeps zones and TSIG keys in the Blue Book's own database,
``directory`` answers lookups from an in-memory copy, ``responder`` turns wire
messages into replies, ``update`` applies RFC 2136 updates and ``server`` runs
the UDP and TCP listeners. ``cli`` is the `mailstack bluebook` command group.
"""
