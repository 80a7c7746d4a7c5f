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

from crawler.fetch.addresses import BlockedAddress
from crawler.fetch.resolver import DNSFailure
from crawler.kinds import ErrorKind


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


def classify(exc: BaseException) -> tuple[ErrorKind, str]:
    if isinstance(exc, BodyTooLarge):
        return ErrorKind.BODY_TOO_LARGE, str(exc)
    if isinstance(exc, aiohttp.TooManyRedirects):
        return ErrorKind.TOO_MANY_REDIRECTS, f"more than {len(exc.history)} redirects" if exc.history else _detail(exc)
    if isinstance(exc, (aiohttp.NonHttpUrlRedirectClientError, aiohttp.InvalidUrlRedirectClientError)):
        return ErrorKind.INVALID_URL, f"redirect to an unsupported URL: {exc}"
    if isinstance(exc, (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError)):
        return ErrorKind.INVALID_URL, _detail(exc)
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return ErrorKind.TIMEOUT, _detail(exc) if str(exc) else "timed out"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return ErrorKind.DNS, f"cannot resolve {exc.host}: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError, ssl.SSLError)):
        return ErrorKind.TLS, _detail(exc)
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, BlockedAddress) or (
            os_error.errno == errno.EACCES and "not allowed (see --allow-net)" in str(os_error)
        ):
            return ErrorKind.BLOCKED, f"{exc.host}: {os_error.strerror or os_error}"
        if isinstance(os_error, asyncio.TimeoutError):
            return ErrorKind.TIMEOUT, f"connecting to {exc.host}:{exc.port} timed out"
        return ErrorKind.CONNECT, f"cannot connect to {exc.host}:{exc.port}: {os_error.strerror or os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return ErrorKind.RESET, "server closed the connection before answering"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)) or (
        isinstance(exc, aiohttp.ClientOSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE)
    ):
        return ErrorKind.RESET, _detail(exc)
    if isinstance(exc, (aiohttp.ClientPayloadError, aiohttp.ClientResponseError)):
        return ErrorKind.PROTOCOL, _detail(exc)
    if isinstance(exc, aiohttp.ClientOSError):
        return ErrorKind.CONNECT, _detail(exc)
    if isinstance(exc, (aiohttp.ClientError, ValueError, UnicodeError)):
        return ErrorKind.PROTOCOL, _detail(exc)
    return ErrorKind.INTERNAL, _detail(exc)
