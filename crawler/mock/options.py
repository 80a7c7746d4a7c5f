"""The mock server's flags, declared once: `crawler mock-server` and `python -m crawler.mock.server`
both take them from here. Only argparse is imported, so the CLI builds its parser without
loading the server (aiohttp)."""

from __future__ import annotations

import argparse


def whole(text: str) -> int:
    """A count or a port: a whole number, not negative."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' cannot be negative")
    return value


def add_server_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: loopback)")
    parser.add_argument("--port", type=whole, default=8080, help="0 picks a free port (default 8080)")
    parser.add_argument("--processes", type=whole, default=1, help="serving processes (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="decides /random and other seeded answers")
    parser.add_argument(
        "--capacity",
        type=whole,
        default=None,
        metavar="N",
        help="answer 503 to a request that arrives while N are in flight (per process)",
    )
    parser.add_argument(
        "--no-path-hits",
        dest="count_paths",
        action="store_false",
        help="count only the total of hits, not each path's (the flaky paths excepted): for"
        " load tests of millions of distinct paths, whose counts would grow the server's memory",
    )
    parser.add_argument(
        "--robots",
        default="none",
        metavar="KNOB",
        help="what /robots.txt answers: none (404), allow, disallow, wildcard, agent, huge,"
        " delay:S, status:N, redirect, redirects:N, slow:MS, flaky:N, reset",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve HTTPS with a certificate made at start (for loopback and *.bench.test)",
    )
    parser.add_argument(
        "--ca-out",
        metavar="PATH",
        help="with --tls, write the CA certificate here (default: a temporary file, named"
        " on the first line, removed at exit): give it to the crawler's --ca-file",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="when stopped, print one JSON line per process: the connections it accepted",
    )
