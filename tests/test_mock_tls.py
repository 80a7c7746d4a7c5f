"""The real web's shape on loopback: the mock server over TLS with a certificate made at start,
trusted by the crawler through --ca-file (or not at all with --insecure), bench URLs spread over
many host names that a DNS responder on loopback resolves, and `crawler bench --hosts N --tls`
reporting what that shape costs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

from conftest import ROOT, run_cli, test_settings
from crawler.fetch.fetcher import Fetcher
from crawler.mock.bench import host_bases, write_urls
from crawler.mock.dns_responder import start_responder, zone_answer
from crawler.mock.server import start_mock_server
from crawler.mock.tls import BENCH_ZONE, generate_certificate

pytestmark = pytest.mark.one_server


@pytest.fixture(scope="module")
def certificate():
    return generate_certificate()


@pytest.fixture
async def tls_mock(certificate):
    runner, url = await start_mock_server(tls=certificate)
    yield url
    await runner.cleanup()


@pytest.fixture
async def bench_names():
    transport, responder, where = await start_responder(zone_answer(BENCH_ZONE))
    yield where
    transport.close()


async def test_the_crawler_trusts_the_mock_servers_ca_by_file_and_by_name(certificate, tls_mock, bench_names, tmp_path):
    assert tls_mock.startswith("https://127.0.0.1:")
    port = tls_mock.rsplit(":", 1)[1]
    ca_file = certificate.write_ca(tmp_path / "ca.pem")
    by_name = f"https://h7.{BENCH_ZONE}:{port}/ok/1"
    async with Fetcher(test_settings(ca_file=str(ca_file), dns_servers=[bench_names])) as fetcher:
        assert (await fetcher.attempt("GET", f"{tls_mock}/ok/1")).status == 200
        assert (await fetcher.attempt("GET", by_name)).status == 200
    async with Fetcher(test_settings(dns_servers=[bench_names])) as fetcher:  # the system's CAs alone
        untrusted = await fetcher.attempt("GET", by_name)
    assert untrusted.error_kind == "tls" and "certificate" in untrusted.error.lower()
    async with Fetcher(test_settings(insecure=True, dns_servers=[bench_names])) as fetcher:
        assert (await fetcher.attempt("GET", by_name)).status == 200


def test_a_missing_or_unreadable_ca_file_is_one_sentence(tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text("https://127.0.0.1:1/\n")
    missing = run_cli("crawl", str(urls), "--ca-file", str(tmp_path / "nope.pem"), "--dsn", "postgresql://unused/")
    assert missing.returncode == 1
    assert missing.stderr.decode().strip() == f"crawler: the CA file '{tmp_path / 'nope.pem'}' does not exist."
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    bad = run_cli("crawl", str(urls), "--ca-file", str(tmp_path / "bad.pem"), "--dsn", "postgresql://unused/")
    assert bad.returncode == 1
    assert bad.stderr.decode().startswith(f"crawler: the CA file '{tmp_path / 'bad.pem'}' cannot be read as PEM")
    assert "Traceback" not in bad.stderr.decode() and bad.stderr.decode().count("\n") == 1


async def test_a_ca_file_that_is_not_pem_stops_the_fetcher_with_one_sentence(tmp_path):
    from crawler.errors import UsageError

    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(UsageError, match=r"^the CA file '.*bad.pem' cannot be read as PEM certificates"):
        async with Fetcher(test_settings(ca_file=str(bad))):
            pass


def test_mock_server_tls_as_a_process_writes_its_ca_and_reports_its_connections(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "crawler.mock.server", "--port", "0", "--tls", "--processes", "2", "--report"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        line = proc.stdout.readline()
        assert "listening on https://127.0.0.1:" in line, proc.stderr.read()
        url = line.split("listening on ", 1)[1].split()[0]
        ca_file = line.split("trust the CA in ", 1)[1].rstrip(")\n")
        assert Path(ca_file).read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        fetched = subprocess.run(
            [
                sys.executable,
                "-c",
                "import ssl, sys, urllib.request;"
                "ctx = ssl.create_default_context(cafile=sys.argv[2]);"
                "[urllib.request.urlopen(sys.argv[1] + f'/ok/{i}', context=ctx).read() for i in range(3)]",
                url,
                ca_file,
            ],
            capture_output=True,
            timeout=60,
        )
        assert fetched.returncode == 0, fetched.stderr.decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    reports = [orjson.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(reports) == 2 and all(r["tls"] for r in reports)
    assert sum(r["connections"] for r in reports) == 3  # urllib: one connection per request
    assert not os.path.exists(ca_file)  # a temporary CA file goes with the server


def test_bench_urls_are_spread_over_host_names(tmp_path):
    assert host_bases("https://127.0.0.1:8443", 3) == [f"https://h{i}.{BENCH_ZONE}:8443" for i in range(3)]
    assert host_bases("http://127.0.0.1:80", None) == ["http://127.0.0.1:80"]
    path = tmp_path / "urls.csv"
    write_urls(path, "https://127.0.0.1:8443", 1000, 0.1, 0, hosts=7)
    urls = path.read_text().splitlines()[1:]
    assert len(urls) == 1000 and len(set(urls)) == 900
    hosts = [u.split("/")[2] for u in urls]
    assert sorted(set(hosts)) == sorted(f"h{i}.{BENCH_ZONE}:8443" for i in range(7))
    # Each host has its even share of the 900 unique URLs (128 or 129), and a duplicate is on
    # the host of the URL it repeats.
    unique = {u.rsplit("/", 1)[1]: u.split("/")[2] for u in urls}
    assert sorted(Counter(unique.values()).values()) == [128] * 3 + [129] * 4
    assert all(u.split("/")[2] == unique[u.rsplit("/", 1)[1]] for u in urls)
    # ...at random places, as in a shuffled list: a process taking every other row, as the bare
    # scripts the crawler is measured against do, meets every host, not only its own half.
    path = tmp_path / "two.csv"
    write_urls(path, "http://127.0.0.1:1", 1000, 0.0, 0, hosts=2)
    rows = path.read_text().splitlines()[1:]
    for parity in (0, 1):
        mine = Counter(u.split("/")[2] for u in rows[parity::2])
        assert len(mine) == 2 and min(mine.values()) > 200, mine
    assert sorted(Counter(u.split("/")[2] for u in rows).values()) == [500, 500]
    write_urls(tmp_path / "one.csv", "http://127.0.0.1:1", 1000, 0.25, 0)
    write_urls(tmp_path / "same.csv", "http://127.0.0.1:1", 1000, 0.25, 0, hosts=None)
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "same.csv").read_text()


def test_bench_over_many_tls_hosts_reports_connections_handshakes_and_lookups(tmp_path, session_dsn):
    path = tmp_path / "summary.json"
    done = run_cli(
        "bench",
        "--urls",
        "600",
        "--hosts",
        "30",
        "--tls",
        "--workers",
        "2",
        "--concurrency",
        "20",
        "--dsn",
        session_dsn,
        "--summary-json",
        str(path),
        "--quiet",
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()
    summary = orjson.loads(path.read_bytes())
    assert summary["ok"] == 600, summary
    bench = summary["bench"]
    assert bench["hosts"] == 30 and bench["tls"] is True
    connections = bench["connections"]
    assert 30 <= connections["new"] <= 600  # at least one per host, at most one per request
    assert connections["new_per_s"] > 0 and connections["tls_handshakes_per_s"] == connections["new_per_s"]
    dns = bench["dns"]
    assert dns["names_asked"] == 30
    # Each of the two workers asks about a name at most once (A and AAAA): 4 questions at most.
    assert 30 <= dns["questions"] <= 30 * 2 * 2 and dns["questions_per_name"] == dns["questions"] / 30
    assert bench["largest_process_rss_bytes"] == max(
        bench["peak_rss_bytes"]["workers"] + [bench["peak_rss_bytes"]["supervisor"]]
    )
