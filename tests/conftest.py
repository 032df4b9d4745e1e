"""Settings shared by every test module."""

import logging

# aiosqlite logs every driver call at DEBUG; that drowns the project's own records.
logging.getLogger("aiosqlite").setLevel(logging.INFO)
