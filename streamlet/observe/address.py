"""Addresses for the status page: parsed and checked without importing the HTTP server."""

from __future__ import annotations

import ipaddress

from streamlet.errors import ConfigError

__all__ = ["is_loopback", "parse_address"]


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT`` as (host, port); loopback by default.

    Raises:
        ConfigError: the text is not an address.
    """
    value = text.strip()
    host, _, port_text = value.rpartition(":")
    if not _:
        host, port_text = "", value
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(
            f"http address {text!r} is not HOST:PORT with a port from 0 to 65535"
            " (for example 127.0.0.1:9100, or :9100 for loopback)"
        )
    return host, port


def is_loopback(host: str) -> bool:
    """Whether ``host`` reaches this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
