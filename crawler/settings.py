"""One typed settings object, resolved from defaults, config/default.toml, a user file, the
environment (CRAWLER_<KEY>) and flags — in that order, each layer overriding the one before.

Nothing here opens a connection or a socket; it only decides values and remembers their source.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import platformdirs

from crawler import __version__
from crawler.errors import UsageError


def project_dir(name: str) -> Path:
    """config/ or migrations/: from the source checkout, else where a wheel installs them."""
    for base in (Path(__file__).resolve().parent.parent, Path(sys.prefix) / "share" / "crawler"):
        if (base / name).is_dir():
            return base / name
    return Path(__file__).resolve().parent.parent / name


DEFAULT_CONFIG = project_dir("config") / "default.toml"
ENV_PREFIX = "CRAWLER_"


@dataclass(slots=True)
class Settings:
    # Database: an external server's DSN, or none for the embedded server under `home`.
    dsn: str | None = None
    home: str = field(default_factory=lambda: platformdirs.user_data_dir("crawler"))
    # Processes and concurrency.
    workers: int | str = "auto"  # "auto" = one per CPU core; 0 = ingest and supervise, fetch elsewhere
    concurrency: int = 200
    chunk_size: int = 1000
    # Timeouts, seconds.
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    total_timeout: float = 60.0
    slow_after: float = 1.0  # a request running longer stops counting against `concurrency`
    # Hosts whose idle keep-alive connections a worker keeps; 0 = none once a host has nothing pending.
    idle_hosts: int = 1000
    # Retries.
    max_attempts: int = 3
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    retry_statuses: list[int] = field(default_factory=lambda: [429, 502, 503, 504])
    retry_after_max: float = 120.0
    # Limits and safety.
    max_redirects: int = 10
    max_body_bytes: int = 10 * 1024 * 1024
    allow_net: list[str] = field(default_factory=list)
    insecure: bool = False
    ca_file: str = ""  # PEM certificates trusted besides the system's; "" = none
    store_bodies: bool = False
    # Politeness, per host (scheme + authority), shared by the job's local workers.
    per_host_concurrency: int = 16
    per_host_max: int = 0
    per_host_rate: float = 0.0
    adaptive_concurrency: bool = True
    # Names the crawler, its version and where its operator is reached: set your own contact.
    user_agent: str = f"crawler/{__version__} (+https://example.invalid/contact)"
    robots: str = "ignore"  # "obey": each host's robots.txt is read once per job and obeyed
    robots_max_delay: float = 30.0  # seconds: the most a robots.txt Crawl-delay may pace a host
    # Name lookups, per worker.
    dns_ttl: float = 300.0  # the longest an answer is reused (its own TTL, if shorter, wins)
    dns_servers: list[str] = field(default_factory=list)  # HOST[:PORT]; none = the system's resolvers
    dns_timeout: float = 5.0
    dns_concurrency: int = 64
    dns_cache_size: int = 100_000
    # Persistence and leases.
    write_batch: int = 1000
    write_interval: float = 0.5
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 5.0
    drain_grace: float = 10.0
    db_outage_limit: float = 300.0
    worker_restarts: int = 5
    restart_backoff: float = 0.5
    # Input and the request cache.
    sort_query: bool = False
    cache_ttl: float = 0.0  # seconds; 0 = no reuse of earlier jobs' responses
    no_cache: bool = False
    # Output.
    progress_interval: float = 5.0
    metrics_port: int = 0  # 0 = no Prometheus endpoint
    metrics_host: str = "127.0.0.1"

    def effective_workers(self) -> int:
        """Worker processes to start on this machine (0: none, the job is fetched elsewhere)."""
        return (os.cpu_count() or 1) if self.workers == "auto" else int(self.workers)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


KEYS = {f.name for f in fields(Settings)}
# What a machine decides for itself when it joins another machine's job: how much it runs, where
# it finds the database, what it serves. Everything else is the job's policy.
MACHINE_KEYS = frozenset({"dsn", "home", "workers", "concurrency", "idle_hosts", "metrics_port", "metrics_host",
                          "progress_interval", "db_outage_limit", "ca_file", "dns_servers"})


def for_job(job_settings: Mapping[str, Any], local: Settings) -> Settings:
    """The settings of a worker joining a job: the job's policy (timeouts, retries, politeness,
    cache, safety) as its crawl stored it, this machine's capacity and addresses; the networks
    allowed are the job's plus this machine's own --allow-net."""
    policy = {k: v for k, v in job_settings.items() if k in KEYS and k not in MACHINE_KEYS}
    merged = Settings(**{**local.as_dict(), **policy})
    merged.allow_net = sorted(set(policy.get("allow_net", [])) | set(local.allow_net))
    return merged


# The flags whose name is not the setting's own, spelt with dashes.
FLAG_NAMES = {"adaptive_concurrency": "--no-adaptive"}


def flag_name(key: str) -> str:
    return FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


def policy_flags_changing(job_settings: Mapping[str, Any], settings: Settings, sources: Mapping[str, str]) -> list[str]:
    """The policy settings given as flags that differ from the job's stored policy: what a
    resumed or retried job refuses, since it runs with the policy it was started with. Machine
    settings and --allow-net (which adds to the job's list) are this run's own; a setting the
    job did not store (a job older than the setting) has no policy to change."""
    return [
        key for key, source in sources.items()
        if source == "flag" and key in KEYS and key not in MACHINE_KEYS and key != "allow_net"
        and key in job_settings and job_settings[key] != getattr(settings, key)
    ]


def _coerce(name: str, value: Any, source: str) -> Any:
    """Turn a value from TOML, the environment or a flag into the field's type."""
    default = getattr(Settings(), name)
    kind = type(default) if default is not None else str
    if name == "cache_ttl" and isinstance(value, str):
        from crawler.cache import parse_duration

        return parse_duration(value)
    if name == "workers":
        return _worker_count(value, source)
    from_text = isinstance(value, str)  # the environment and comma lists: items are text too
    original = value
    try:
        if isinstance(value, str) and kind is not str:
            if kind is bool:
                lowered = value.strip().lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return lowered in ("1", "true", "yes", "on")
            if kind is list:
                value = [item.strip() for item in value.split(",") if item.strip()]
            else:
                return kind(value)
        if kind is list:
            if not isinstance(value, list):
                raise ValueError(value)
            item_kind = int if name == "retry_statuses" else str
            return [item_kind(item) if from_text else _checked(item, item_kind) for item in value]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is not type(value) and not (kind is str and value is None):
            raise ValueError(value)
        return value
    except ValueError:
        what = {int: "a whole number", float: "a number", bool: "true or false", str: "a string",
                list: "a list of whole numbers" if name == "retry_statuses" else "a list of strings"}[kind]
        raise UsageError(f"setting '{name}' from {source} must be {what}, not {original!r}.") from None


def _worker_count(value: Any, source: str) -> int | str:
    """'auto' or a whole number: the one setting that takes either."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(value)
        return int(value)
    except ValueError:
        raise UsageError(f"setting 'workers' from {source} must be 'auto' or a whole number, not {value!r}.") from None


def _checked(item: Any, kind: type) -> Any:
    if not isinstance(item, kind) or isinstance(item, bool):
        raise ValueError(item)
    return item


def _validate(settings: Settings) -> None:
    positive = ("concurrency", "chunk_size", "max_attempts", "write_batch", "dns_concurrency")
    for name in positive:
        if getattr(settings, name) < 1:
            raise UsageError(f"setting '{name}' must be at least 1, not {getattr(settings, name)}.")
    if isinstance(settings.workers, int) and settings.workers < 0:
        raise UsageError(f"setting 'workers' must be 'auto', 0 (fetch elsewhere) or more, not {settings.workers}.")
    if not 0 <= settings.metrics_port <= 65535:
        raise UsageError(f"setting 'metrics_port' must be a port number (0 = off), not {settings.metrics_port}.")
    for name in ("connect_timeout", "read_timeout", "total_timeout", "lease_seconds", "write_interval",
                 "heartbeat_seconds", "db_outage_limit", "progress_interval", "dns_timeout", "slow_after"):
        if not getattr(settings, name) > 0:  # also refuses NaN
            raise UsageError(f"setting '{name}' must be greater than 0.")
    for name in ("per_host_concurrency", "per_host_max"):
        if getattr(settings, name) < 0:
            raise UsageError(f"setting '{name}' cannot be negative (0 means: no limit of its own).")
    if not settings.per_host_rate >= 0:
        raise UsageError("setting 'per_host_rate' cannot be negative (0 means: no rate limit).")
    if settings.worker_restarts < 0:
        raise UsageError("setting 'worker_restarts' cannot be negative.")
    for name in ("backoff_base", "backoff_max", "retry_after_max", "dns_ttl", "drain_grace", "restart_backoff",
                 "cache_ttl"):
        if not getattr(settings, name) >= 0:
            raise UsageError(f"setting '{name}' cannot be negative.")
    if settings.robots not in ("obey", "ignore"):
        raise UsageError(f"setting 'robots' must be 'obey' or 'ignore', not {settings.robots!r}.")
    if not settings.robots_max_delay >= 0:
        raise UsageError("setting 'robots_max_delay' cannot be negative.")
    if settings.idle_hosts < 0:
        raise UsageError("setting 'idle_hosts' cannot be negative"
                         " (0 means: close a host's connections once it has nothing pending).")
    if settings.dns_cache_size < 0:
        raise UsageError("setting 'dns_cache_size' cannot be negative (0 means: no cache).")
    from crawler.resolver import parse_server

    for server in settings.dns_servers:
        parse_server(server)  # a clear error now, not in every worker
    if settings.ca_file and not os.path.isfile(settings.ca_file):
        raise UsageError(f"the CA file '{settings.ca_file}' does not exist.")
    if settings.max_body_bytes < 0 or settings.max_redirects < 0:
        raise UsageError("settings 'max_body_bytes' and 'max_redirects' cannot be negative.")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file '{path}' does not exist.") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file '{path}' is not valid TOML: {exc}.") from None
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise UsageError(f"config file '{path}' has unknown setting '{unknown[0]}'.")
    return data


def load_settings(
    *,
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> tuple[Settings, dict[str, str]]:
    """Resolve every setting; return it with a map of key -> where its value came from."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources = {name: "default" for name in KEYS}
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if DEFAULT_CONFIG.exists():
        layers.append((str(DEFAULT_CONFIG), _read_toml(DEFAULT_CONFIG)))
    if config_file is not None:
        layers.append((str(config_file), _read_toml(Path(config_file))))
    env_values = {
        key[len(ENV_PREFIX):].lower(): value
        for key, value in environ.items()
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX):].lower() in KEYS
    }
    layers.append(("environment", env_values))
    layers.append(("flag", {k: v for k, v in (flags or {}).items() if v is not None}))
    for source, layer in layers:
        for name, value in layer.items():
            values[name] = _coerce(name, value, source if source != "environment" else f"{ENV_PREFIX}{name.upper()}")
            sources[name] = source
    settings = Settings(**values)
    _validate(settings)
    return settings, sources
