"""One typed settings object, resolved from defaults, config/default.toml, a user file, the
environment (CRAWLER_<KEY>) and flags — in that order, each layer overriding the one before.

Each field is declared once, here: its type, its default, one line of help, whose decision it is
(the job's policy or the machine's own) and its command-line flag. The CLI's flags and their help,
the check that config/default.toml documents every default, what a joining worker takes from the
job, and the retry policy are all derived from those declarations. Settings are frozen and
validated whenever one is made (`dataclasses.replace` makes a new one).

Nothing here opens a connection or a socket; it only decides values and remembers their source.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from crawler import __version__
from crawler.errors import UsageError

if TYPE_CHECKING:
    from crawler.fetch.retry import RetryPolicy


def project_dir(name: str) -> Path:
    """config/ or migrations/: from the source checkout, else where a wheel installs them."""
    for base in (Path(__file__).resolve().parent.parent, Path(sys.prefix) / "share" / "crawler"):
        if (base / name).is_dir():
            return base / name
    return Path(__file__).resolve().parent.parent / name


DEFAULT_CONFIG = project_dir("config") / "default.toml"
ENV_PREFIX = "CRAWLER_"


class Scope(StrEnum):
    """Whose decision a setting is once a job exists: a resumed, retried or joined job runs with
    the policy it was started with; only capacity and addresses are each machine's own."""

    POLICY = "policy"  # the job's: stored with it, kept by resume, retry and joining workers
    MACHINE = "machine"  # each machine's own: capacity, its database, its files and resolvers, what it serves
    MERGED = "merged"  # a list of the job's to which each machine adds its own (allow_net)


class Reach(StrEnum):
    """Which commands take a setting's flag."""

    EVERY = "every"  # every command that reads settings
    RUN = "run"  # crawl, resume, retry and bench; `crawler worker` too, unless the setting is the job's alone
    START = "start"  # crawl and bench only: decided when a job starts, not by a resume


@dataclass(frozen=True, slots=True)
class Flag:
    """A setting's command-line flag. Its type, default and help are the setting's own; a bool
    setting's flag turns it to the opposite of its default, a list's flag is repeated."""

    name: str = ""  # "" = the key with dashes: per_host_rate -> --per-host-rate
    metavar: str | None = None
    reach: Reach = Reach.RUN
    text: bool = False  # the value is text the settings parse (a duration), not the field's type


def setting(
    default: Any,
    help: str,
    *,
    scope: Scope = Scope.POLICY,
    flag: Flag | None = None,
    choices: tuple[str, ...] = (),
    factory: Any = None,
) -> Any:
    """A field of Settings and its declaration. `help` is one line, as the flag's help shows it;
    config/default.toml gives the reasons behind the default."""
    metadata = {"help": help, "scope": scope, "flag": flag, "choices": choices, "default": default}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    if isinstance(default, list):
        return field(default_factory=default.copy, metadata=metadata)
    return field(default=default, metadata=metadata)


def _user_data_dir() -> str:
    import platformdirs  # when settings are made, not when `crawler --help` reads the declarations

    return platformdirs.user_data_dir("crawler")


class Timeouts(NamedTuple):
    """An attempt's limits, in seconds: the connection (TCP and TLS), each read, the whole attempt."""

    connect: float
    read: float
    total: float


class WriterSettings(NamedTuple):
    """How a worker's writer batches: rows per COPY, seconds between flushes, and the lease a
    chunk's completion renews."""

    batch_size: int
    interval: float
    lease_seconds: float


class HostBudget(NamedTuple):
    """A host's budget in one worker (HostScheduler's initial and maximum in flight, and its rate)."""

    initial: int
    maximum: int
    rate: float


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the crawler: its default, a line of help, its scope and its flag.
    config/default.toml documents each with its reason (a test holds the two equal)."""

    # Database: an external server's DSN, or none for the embedded server under `home`.
    dsn: str | None = setting(
        None,
        "PostgreSQL URL (else CRAWLER_DSN, else DATABASE_URL, else the embedded server)",
        scope=Scope.MACHINE,
        flag=Flag(reach=Reach.EVERY),
    )
    home: str = setting(
        None, "where the embedded PostgreSQL keeps its data", scope=Scope.MACHINE, factory=_user_data_dir
    )
    # Processes and concurrency.
    workers: int | str = setting(
        "auto",
        "worker processes here: auto = one per core; 0 = only ingest and"
        " supervise, `crawler worker` on other machines fetches",
        scope=Scope.MACHINE,
        flag=Flag(metavar="N"),
    )
    concurrency: int = setting(200, "fetch tasks per worker", scope=Scope.MACHINE, flag=Flag(metavar="N"))
    chunk_size: int = setting(1000, "rows per chunk, the unit of leasing", flag=Flag(metavar="N", reach=Reach.START))
    # Timeouts, seconds.
    connect_timeout: float = setting(10.0, "seconds to establish a TCP (and TLS) connection")
    read_timeout: float = setting(30.0, "seconds to wait for the next bytes of a response")
    total_timeout: float = setting(60.0, "seconds for a whole attempt, from connect to the body's last byte")
    slow_after: float = setting(1.0, "seconds after which a request stops counting against concurrency")
    idle_hosts: int = setting(
        1000,
        "hosts whose idle keep-alive connections a worker keeps (0: none once a host has nothing pending)",
        scope=Scope.MACHINE,
    )
    # Retries.
    max_attempts: int = setting(3, "attempts per request, the first included", flag=Flag(metavar="N"))
    backoff_base: float = setting(0.5, "seconds: the first retry's backoff ceiling, doubled per attempt")
    backoff_max: float = setting(30.0, "seconds: the longest backoff")
    retry_statuses: list[int] = setting([429, 502, 503, 504], "HTTP statuses retried like a failed connection")
    retry_after_max: float = setting(120.0, "seconds: the longest Retry-After honoured")
    # Limits and safety.
    max_redirects: int = setting(10, "redirect hops followed before the result is too_many_redirects")
    max_body_bytes: int = setting(
        10 * 1024 * 1024, "body cap in bytes after decompression; 0 = read none", flag=Flag(metavar="N")
    )
    allow_net: list[str] = setting(
        [],
        "allow fetching this loopback or private network (repeatable; a resumed or joined job adds it to its own list)",
        scope=Scope.MERGED,
        flag=Flag(metavar="CIDR"),
    )
    insecure: bool = setting(False, "do not verify TLS certificates", flag=Flag())
    ca_file: str = setting(
        "",
        "also trust the CA certificates in this file (each machine's own)",
        scope=Scope.MACHINE,
        flag=Flag(metavar="PEM"),
    )
    store_bodies: bool = setting(False, "keep response bodies, compressed", flag=Flag())
    # Politeness, per host (scheme + authority), shared by the job's workers.
    per_host_concurrency: int = setting(
        16, "requests in flight per host to start with, adapting to its answers; 0 = no limit", flag=Flag(metavar="N")
    )
    per_host_max: int = setting(0, "the most requests in flight per host the limit grows to; 0 = concurrency")
    per_host_rate: float = setting(0.0, "new requests per second per host; 0 = no rate limit", flag=Flag(metavar="R"))
    adaptive_concurrency: bool = setting(
        True,
        "keep each host's limit fixed instead of adapting it to the host's answers",
        flag=Flag(name="--no-adaptive"),
    )
    # Names the crawler, its version and where its operator is reached: set your own contact.
    user_agent: str = setting(
        f"crawler/{__version__} (+https://example.invalid/contact)",
        "the User-Agent sent with every request, robots.txt fetches included",
    )
    robots: str = setting(
        "ignore",
        "obey each host's robots.txt (read once per host per job), or ignore it (for"
        " URLs you own or may fetch); kept by resume and by `crawler worker`",
        flag=Flag(reach=Reach.START),
        choices=("obey", "ignore"),
    )
    robots_max_delay: float = setting(30.0, "seconds: the most a robots.txt Crawl-delay may pace a host")
    # Name lookups, per worker.
    dns_ttl: float = setting(300.0, "seconds: the longest an answer is reused (its own TTL, if shorter, wins)")
    dns_servers: list[str] = setting(
        [],
        "resolve names with this DNS server (repeatable; default: the system's)",
        scope=Scope.MACHINE,
        flag=Flag(name="--dns-server", metavar="HOST[:PORT]"),
    )
    dns_timeout: float = setting(5.0, "seconds before a lookup fails as a transient dns error")
    dns_concurrency: int = setting(64, "lookups in flight at once, per worker")
    dns_cache_size: int = setting(100_000, "names whose answers a worker keeps; 0 = no cache")
    # Persistence and leases.
    write_batch: int = setting(1000, "results written with one COPY")
    write_interval: float = setting(0.5, "seconds: the longest a result waits for its batch")
    lease_seconds: float = setting(60.0, "seconds a leased chunk lasts without renewal")
    heartbeat_seconds: float = setting(5.0, "seconds between a worker's lease renewals")
    drain_grace: float = setting(10.0, "seconds requests in flight get to finish on Ctrl-C or SIGTERM")
    db_outage_limit: float = setting(300.0, "seconds a database outage is waited out", scope=Scope.MACHINE)
    worker_restarts: int = setting(5, "restarts of a local worker slot before the job stops as broken")
    restart_backoff: float = setting(0.5, "seconds before a worker's first restart, doubled per restart")
    # Input and the request cache.
    sort_query: bool = setting(False, "sort query parameters when normalizing URLs")
    cache_ttl: float = setting(
        0.0, "reuse earlier jobs' responses this fresh: 90s, 2h, 1d; 0 = off", flag=Flag(metavar="DURATION", text=True)
    )
    no_cache: bool = setting(False, "fetch every row, duplicates included", flag=Flag())
    # Output.
    progress_interval: float = setting(
        5.0, "seconds between progress lines when the output is not a terminal", scope=Scope.MACHINE
    )
    metrics_port: int = setting(
        0,
        "serve Prometheus metrics on this port, all worker processes together; 0 = off",
        scope=Scope.MACHINE,
        flag=Flag(metavar="PORT"),
    )
    metrics_host: str = setting("127.0.0.1", "the address the Prometheus metrics are served on", scope=Scope.MACHINE)

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_values(cls, values: Mapping[str, Any], source: str) -> Settings:
        """Settings from typed values handed over whole (a worker's orders, a job's stored
        policy): each value checked as a config file's would be, an unknown key refused."""
        unknown = sorted(set(values) - KEYS)
        if unknown:
            raise UsageError(f"unknown setting '{unknown[0]}' from {source}.")
        return cls(**{name: _coerce(name, value, source) for name, value in values.items()})

    def effective_workers(self) -> int:
        """Worker processes to start on this machine (0: none, the job is fetched elsewhere)."""
        return (os.cpu_count() or 1) if self.workers == "auto" else int(self.workers)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def retry_policy(self) -> RetryPolicy:
        from crawler.fetch.retry import RetryPolicy  # retry.py reads its defaults from this module

        return RetryPolicy(
            max_attempts=self.max_attempts,
            backoff_base=self.backoff_base,
            backoff_max=self.backoff_max,
            retry_statuses=frozenset(self.retry_statuses),
            retry_after_max=self.retry_after_max,
        )

    @property
    def timeouts(self) -> Timeouts:
        return Timeouts(connect=self.connect_timeout, read=self.read_timeout, total=self.total_timeout)

    @property
    def writer(self) -> WriterSettings:
        return WriterSettings(
            batch_size=self.write_batch, interval=self.write_interval, lease_seconds=self.lease_seconds
        )

    def host_budget(self, share: int) -> HostBudget:
        """A host's budget for one of `share` workers: the job's per-host limits are shared by
        every live worker of the job, not multiplied by them (0 = no limit of its own)."""
        return HostBudget(
            initial=max(1, self.per_host_concurrency // share) if self.per_host_concurrency else self.concurrency,
            maximum=max(1, self.per_host_max // share) if self.per_host_max else self.concurrency,
            rate=self.per_host_rate / share,
        )


class Declaration(NamedTuple):
    """One setting as declared: what the CLI's flags, the configuration's documentation check and
    the layers' coercion read."""

    name: str
    kind: type  # int, float, bool, str or list (dsn: str or None; workers: "auto" or an int)
    item: type | None  # a list's items
    default: Any  # None for `home`, the platform's data directory, decided when settings are made
    help: str
    scope: Scope
    flag: Flag | None
    choices: tuple[str, ...]

    @property
    def flag_name(self) -> str:
        return self.flag.name if self.flag is not None and self.flag.name else "--" + self.name.replace("_", "-")


def _declare(f: dataclasses.Field, hint: Any) -> Declaration:
    meta = f.metadata
    kind = typing.get_origin(hint) or hint
    if kind is not list:
        kind = type(meta["default"]) if meta["default"] is not None else str
    item = typing.get_args(hint)[0] if kind is list else None
    return Declaration(f.name, kind, item, meta["default"], meta["help"], meta["scope"], meta["flag"], meta["choices"])


_HINTS = typing.get_type_hints(Settings)
DECLARATIONS: dict[str, Declaration] = {f.name: _declare(f, _HINTS[f.name]) for f in fields(Settings)}
KEYS = frozenset(DECLARATIONS)
_MAY_BE_NONE = frozenset(name for name, hint in _HINTS.items() if type(None) in typing.get_args(hint))  # dsn
# What a machine decides for itself when it joins another machine's job: how much it runs, where
# it finds the database, what it serves. Everything else is the job's policy.
MACHINE_KEYS = frozenset(name for name, d in DECLARATIONS.items() if d.scope is Scope.MACHINE)


def for_job(job_settings: Mapping[str, Any], local: Settings) -> Settings:
    """The settings of a worker joining a job: the job's policy (timeouts, retries, politeness,
    cache, safety) as its crawl stored it, this machine's capacity and addresses; a merged list
    (the networks allowed) is the job's and this machine's own together."""
    policy = {k: v for k, v in job_settings.items() if k in KEYS and k not in MACHINE_KEYS}
    for name, declared in DECLARATIONS.items():
        if declared.scope is Scope.MERGED:
            policy[name] = sorted(set(policy.get(name, [])) | set(getattr(local, name)))
    return Settings.from_values({**local.as_dict(), **policy}, "the job's stored settings")


def flag_name(key: str) -> str:
    return DECLARATIONS[key].flag_name


def policy_flags_changing(job_settings: Mapping[str, Any], settings: Settings, sources: Mapping[str, str]) -> list[str]:
    """The policy settings given as flags that differ from the job's stored policy: what a
    resumed or retried job refuses, since it runs with the policy it was started with. Machine
    settings and --allow-net (which adds to the job's list) are this run's own; a setting the
    job did not store (a job older than the setting) has no policy to change."""
    return [
        key
        for key, source in sources.items()
        if source == "flag"
        and key in KEYS
        and DECLARATIONS[key].scope is Scope.POLICY
        and key in job_settings
        and job_settings[key] != getattr(settings, key)
    ]


def _coerce(name: str, value: Any, source: str) -> Any:
    """Turn a value from TOML, the environment, a flag or a handed-over mapping into the field's
    type; anything else is one sentence naming the setting and where the value came from."""
    declared = DECLARATIONS[name]
    kind = declared.kind
    if name == "cache_ttl" and isinstance(value, str):
        from crawler.ledger.cache import parse_duration

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
            item_kind = declared.item or str
            return [item_kind(item) if from_text else _checked(item, item_kind) for item in value]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is not type(value) and not (value is None and name in _MAY_BE_NONE):
            raise ValueError(value)
        return value
    except ValueError:
        what = {
            int: "a whole number",
            float: "a number",
            bool: "true or false",
            str: "a string",
            list: "a list of whole numbers" if declared.item is int else "a list of strings",
        }[kind]
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
    for name in (
        "connect_timeout",
        "read_timeout",
        "total_timeout",
        "lease_seconds",
        "write_interval",
        "heartbeat_seconds",
        "db_outage_limit",
        "progress_interval",
        "dns_timeout",
        "slow_after",
    ):
        if not getattr(settings, name) > 0:  # also refuses NaN
            raise UsageError(f"setting '{name}' must be greater than 0.")
    for name in ("per_host_concurrency", "per_host_max"):
        if getattr(settings, name) < 0:
            raise UsageError(f"setting '{name}' cannot be negative (0 means: no limit of its own).")
    if not settings.per_host_rate >= 0:
        raise UsageError("setting 'per_host_rate' cannot be negative (0 means: no rate limit).")
    if settings.worker_restarts < 0:
        raise UsageError("setting 'worker_restarts' cannot be negative.")
    for name in (
        "backoff_base",
        "backoff_max",
        "retry_after_max",
        "dns_ttl",
        "drain_grace",
        "restart_backoff",
        "cache_ttl",
    ):
        if not getattr(settings, name) >= 0:
            raise UsageError(f"setting '{name}' cannot be negative.")
    for declared in DECLARATIONS.values():
        value = getattr(settings, declared.name)
        if declared.choices and value not in declared.choices:
            allowed = " or ".join(repr(choice) for choice in declared.choices)
            raise UsageError(f"setting '{declared.name}' must be {allowed}, not {value!r}.")
    if not settings.robots_max_delay >= 0:
        raise UsageError("setting 'robots_max_delay' cannot be negative.")
    if settings.idle_hosts < 0:
        raise UsageError(
            "setting 'idle_hosts' cannot be negative (0 means: close a host's connections once it has nothing pending)."
        )
    if settings.dns_cache_size < 0:
        raise UsageError("setting 'dns_cache_size' cannot be negative (0 means: no cache).")
    if settings.dns_servers:
        from crawler.fetch.resolver import parse_server  # pycares: only when there is a server to read

        for server in settings.dns_servers:
            parse_server(server)  # a clear error now, not in every worker
    if settings.ca_file and not os.path.isfile(settings.ca_file):
        raise UsageError(f"the CA file '{settings.ca_file}' does not exist.")
    if settings.max_body_bytes < 0 or settings.max_redirects < 0:
        raise UsageError("settings 'max_body_bytes' and 'max_redirects' cannot be negative.")


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib  # when settings are loaded, not when `crawler --help` reads the declarations

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
        key[len(ENV_PREFIX) :].lower(): value
        for key, value in environ.items()
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in KEYS
    }
    layers.append(("environment", env_values))
    layers.append(("flag", {k: v for k, v in (flags or {}).items() if v is not None}))
    for source, layer in layers:
        for name, value in layer.items():
            values[name] = _coerce(name, value, source if source != "environment" else f"{ENV_PREFIX}{name.upper()}")
            sources[name] = source
    return Settings(**values), sources  # validated as it is made
