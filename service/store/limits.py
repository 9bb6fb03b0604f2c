"""Limits on what a caller may ask for, each named once and used by every door (HTTP and
the command line). Issue 14 grows this into the table of every field's bound."""

from __future__ import annotations

# A token works at most this long after it is created (an expiry is a number a caller sends).
MAX_TOKEN_LIFETIME_S = 10 * 365 * 86400
MIN_TOKEN_LIFETIME_S = 60
