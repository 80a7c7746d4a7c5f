"""Classifies what went wrong with a request into a stable error kind and a readable detail.

Pure: takes an exception, returns (kind, detail). A request's failure is data, never an exception
that escapes a worker.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl

import aiohttp

from crawler.addresses import BlockedAddress
from crawler.resolver import DNSFailure

ERROR_KINDS = (
    "timeout", "connect", "dns", "tls", "reset", "protocol", "too_many_redirects",
    "body_too_large", "blocked", "invalid_url", "http_status", "internal",
    "robots",  # refused by the host's robots.txt (--robots obey), or robots.txt unreachable; never retried
)


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"body larger than {limit} bytes")


def _detail(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def transient(exc: BaseException) -> bool:
    """Whether a failure whose kind is not retried as such may still succeed if tried again: a
    `dns` failure of the resolver (SERVFAIL, no answer in time), unlike a name that does not
    exist (NXDOMAIN). The kind stays `dns` either way; retry.decide reads this flag."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        os_error = exc.os_error
        if isinstance(os_error, DNSFailure):
            return os_error.transient
        return isinstance(os_error, socket.gaierror) and os_error.errno == socket.EAI_AGAIN
    return False


def classify(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, BodyTooLarge):
        return "body_too_large", str(exc)
    if isinstance(exc, aiohttp.TooManyRedirects):
        return "too_many_redirects", f"more than {len(exc.history)} redirects" if exc.history else _detail(exc)
    if isinstance(exc, (aiohttp.NonHttpUrlRedirectClientError, aiohttp.InvalidUrlRedirectClientError)):
        return "invalid_url", f"redirect to an unsupported URL: {exc}"
    if isinstance(exc, (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError)):
        return "invalid_url", _detail(exc)
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return "timeout", _detail(exc) if str(exc) else "timed out"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "dns", f"cannot resolve {exc.host}: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError, ssl.SSLError)):
        return "tls", _detail(exc)
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, BlockedAddress) or (
            os_error.errno == errno.EACCES and "not allowed (see --allow-net)" in str(os_error)
        ):
            return "blocked", f"{exc.host}: {os_error.strerror or os_error}"
        if isinstance(os_error, asyncio.TimeoutError):
            return "timeout", f"connecting to {exc.host}:{exc.port} timed out"
        return "connect", f"cannot connect to {exc.host}:{exc.port}: {os_error.strerror or os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "reset", "server closed the connection before answering"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)) or (
        isinstance(exc, aiohttp.ClientOSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE)
    ):
        return "reset", _detail(exc)
    if isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ClientResponseError)):
        return "protocol", _detail(exc)
    if isinstance(exc, aiohttp.ClientOSError):
        return "connect", _detail(exc)
    if isinstance(exc, (aiohttp.ClientError, ValueError, UnicodeError)):
        return "protocol", _detail(exc)
    return "internal", _detail(exc)
