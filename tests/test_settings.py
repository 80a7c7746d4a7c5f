"""Settings: the layers (defaults < config/default.toml < --config < CRAWLER_<KEY> < flags), the
coercion of environment strings, the errors for bad values and files, and config/default.toml kept
equal to the dataclass defaults."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import ROOT
from crawler.errors import UsageError
from crawler.settings import (
    DECLARATIONS,
    DEFAULT_CONFIG,
    KEYS,
    MACHINE_KEYS,
    Scope,
    Settings,
    flag_name,
    for_job,
    load_settings,
)

DOCUMENTED_ELSEWHERE = {"dsn", "home"}  # commented out in default.toml: no value is the default


def write(tmp_path: Path, text: str, name: str = "crawler.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def usage_error(**kwargs) -> str:
    with pytest.raises(UsageError) as caught:
        load_settings(**kwargs)
    return str(caught.value)


def assert_one_sentence(message: str) -> None:
    assert message.endswith(".")
    assert message[0].isalpha() or message[0] == "'"
    assert "\n" not in message and "Traceback" not in message


# --- config/default.toml never drifts from the code -------------------------------------------


def toml_disagreements(text: str) -> list[str]:
    """The keys where a configuration text and the dataclass part: a key missing or extra, or a
    value (or its type) other than the field's default."""
    documented = tomllib.loads(text)
    defaults = Settings()
    expected = {
        f.name: getattr(defaults, f.name) for f in dataclasses.fields(Settings) if f.name not in DOCUMENTED_ELSEWHERE
    }
    return sorted(
        name
        for name in documented.keys() | expected.keys()
        if name not in documented
        or name not in expected
        or documented[name] != expected[name]
        or type(documented[name]) is not type(expected[name])
    )


def test_default_toml_lists_every_setting_with_the_dataclass_default() -> None:
    assert toml_disagreements(DEFAULT_CONFIG.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (("concurrency = 200", "concurrency = 201"), "concurrency"),  # a default changed in one place only
        (("connect_timeout = 10.0", "connect_timeout = 10"), "connect_timeout"),  # the field's type lost
        (("retry_statuses = [429, 502, 503, 504]", "retry_statuses = [429, 503]"), "retry_statuses"),
        (("\nsort_query = false", "\n# sort_query = false"), "sort_query"),  # a setting left out
        (("\nmetrics_host", "\nmetrics_hots = 0\nmetrics_host"), "metrics_hots"),  # a key no field has
    ],
)
def test_the_documentation_check_names_a_default_that_disagrees(change: tuple[str, str], key: str) -> None:
    text = DEFAULT_CONFIG.read_text(encoding="utf-8")
    assert change[0] in text
    assert toml_disagreements(text.replace(change[0], change[1], 1)) == [key]


def test_each_declaration_is_the_dataclass_field_it_describes() -> None:
    defaults = Settings(home="/srv/crawler")
    assert list(DECLARATIONS) == [f.name for f in dataclasses.fields(Settings)]
    for name, declared in DECLARATIONS.items():
        if name != "home":  # the platform's data directory
            assert declared.default == getattr(defaults, name), name
        assert declared.help.strip() and "\n" not in declared.help, name
        assert declared.kind in (int, float, bool, str, list), name


def test_default_toml_documents_dsn_and_home_commented_out() -> None:
    lines = DEFAULT_CONFIG.read_text(encoding="utf-8").splitlines()
    for name in DOCUMENTED_ELSEWHERE:
        assert any(line.startswith(f"# {name} = ") for line in lines), f"{name} is not documented"


def test_default_toml_values_have_the_fields_types() -> None:
    documented = tomllib.loads(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    for name, value in documented.items():
        assert type(value) is type(getattr(Settings(), name)), name


# --- the layers and their sources -------------------------------------------------------------


def test_with_nothing_given_the_values_are_the_defaults() -> None:
    settings, sources = load_settings(environ={})
    assert settings == Settings(home=settings.home)
    assert set(sources) == KEYS
    assert sources["dsn"] == "default" and sources["home"] == "default"
    assert sources["concurrency"] == str(DEFAULT_CONFIG)


def test_each_layer_overrides_the_one_before_and_is_named_in_sources(tmp_path: Path) -> None:
    config = write(tmp_path, "concurrency = 5\nchunk_size = 7\nwrite_batch = 9\n")
    settings, sources = load_settings(
        config_file=config,
        environ={"CRAWLER_CHUNK_SIZE": "8", "CRAWLER_WRITE_BATCH": "10", "PATH": "/bin"},
        flags={"write_batch": 11, "max_redirects": None},  # None: the flag was not given
    )
    assert (settings.concurrency, settings.chunk_size, settings.write_batch) == (5, 8, 11)
    assert sources["concurrency"] == str(config)
    assert sources["chunk_size"] == "environment"
    assert sources["write_batch"] == "flag"
    assert sources["max_redirects"] == str(DEFAULT_CONFIG) and settings.max_redirects == 10
    assert sources["dsn"] == "default" and settings.dsn is None


def test_a_config_file_may_set_dsn_and_home(tmp_path: Path) -> None:
    config = write(tmp_path, 'dsn = "postgresql://u@127.0.0.1/db"\nhome = "/srv/crawler"\n')
    settings, sources = load_settings(config_file=config, environ={})
    assert settings.dsn == "postgresql://u@127.0.0.1/db" and settings.home == "/srv/crawler"
    assert sources["dsn"] == sources["home"] == str(config)


def test_the_environment_reads_only_crawler_keys_it_knows() -> None:
    settings, sources = load_settings(
        environ={"CRAWLER_DSN": "postgresql://127.0.0.1/x", "CRAWLER_NO_SUCH_KEY": "1", "CONCURRENCY": "9"}
    )
    assert settings.dsn == "postgresql://127.0.0.1/x" and sources["dsn"] == "environment"
    assert settings.concurrency == 200


def test_the_environment_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRAWLER_CONCURRENCY", "42")
    settings, sources = load_settings()
    assert settings.concurrency == 42 and sources["concurrency"] == "environment"


# --- coercion of environment strings ----------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "name", "expected"),
    [
        ("CRAWLER_CONCURRENCY", "500", "concurrency", 500),
        ("CRAWLER_WORKERS", " 4 ", "workers", 4),
        ("CRAWLER_CONNECT_TIMEOUT", "2.5", "connect_timeout", 2.5),
        ("CRAWLER_READ_TIMEOUT", "7", "read_timeout", 7.0),
        ("CRAWLER_SORT_QUERY", "true", "sort_query", True),
        ("CRAWLER_SORT_QUERY", "YES", "sort_query", True),
        ("CRAWLER_SORT_QUERY", "1", "sort_query", True),
        ("CRAWLER_SORT_QUERY", "on", "sort_query", True),
        ("CRAWLER_SORT_QUERY", "false", "sort_query", False),
        ("CRAWLER_SORT_QUERY", "0", "sort_query", False),
        ("CRAWLER_SORT_QUERY", "off", "sort_query", False),
        ("CRAWLER_ALLOW_NET", "127.0.0.1/32,10.0.0.0/8", "allow_net", ["127.0.0.1/32", "10.0.0.0/8"]),
        ("CRAWLER_ALLOW_NET", " 127.0.0.1/32 , ,::1/128 ", "allow_net", ["127.0.0.1/32", "::1/128"]),
        ("CRAWLER_ALLOW_NET", "", "allow_net", []),
        ("CRAWLER_RETRY_STATUSES", "429,503", "retry_statuses", [429, 503]),
        ("CRAWLER_USER_AGENT", "me/1.0, with a comma", "user_agent", "me/1.0, with a comma"),
        ("CRAWLER_HOME", "/srv/crawler", "home", "/srv/crawler"),
    ],
)
def test_environment_strings_are_coerced_to_the_fields_type(variable, value, name, expected) -> None:
    settings, sources = load_settings(environ={variable: value})
    actual = getattr(settings, name)
    assert actual == expected and type(actual) is type(expected)
    assert sources[name] == "environment"


@given(st.integers(1, 10**6))
def test_any_positive_integer_from_the_environment_round_trips(value: int) -> None:
    settings, _ = load_settings(environ={"CRAWLER_CHUNK_SIZE": str(value)})
    assert settings.chunk_size == value


@given(st.lists(st.integers(100, 599), max_size=6))
def test_any_comma_list_of_statuses_round_trips(statuses: list[int]) -> None:
    settings, _ = load_settings(environ={"CRAWLER_RETRY_STATUSES": ",".join(map(str, statuses))})
    assert settings.retry_statuses == statuses


def test_an_int_in_toml_is_accepted_for_a_float_setting(tmp_path: Path) -> None:
    settings, _ = load_settings(config_file=write(tmp_path, "connect_timeout = 3\n"), environ={})
    assert settings.connect_timeout == 3.0 and type(settings.connect_timeout) is float


# --- bad values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CRAWLER_CONCURRENCY", "many"),
        ("CRAWLER_CONCURRENCY", "2.5"),
        ("CRAWLER_CONCURRENCY", ""),
        ("CRAWLER_CONNECT_TIMEOUT", "fast"),
        ("CRAWLER_SORT_QUERY", "maybe"),
        ("CRAWLER_RETRY_STATUSES", "429,abc"),
    ],
)
def test_an_unreadable_environment_value_is_a_usage_error_naming_the_variable(variable: str, value: str) -> None:
    name = variable.removeprefix("CRAWLER_").lower()
    message = usage_error(environ={variable: value})
    assert f"'{name}'" in message and variable in message and repr(value) in message
    assert_one_sentence(message)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CRAWLER_CONCURRENCY", "0"),
        ("CRAWLER_CHUNK_SIZE", "-1"),
        ("CRAWLER_MAX_ATTEMPTS", "0"),
        ("CRAWLER_WRITE_BATCH", "0"),
        ("CRAWLER_WORKERS", "-1"),
        ("CRAWLER_CONNECT_TIMEOUT", "0"),
        ("CRAWLER_READ_TIMEOUT", "-1"),
        ("CRAWLER_TOTAL_TIMEOUT", "0"),
        ("CRAWLER_LEASE_SECONDS", "0"),
        ("CRAWLER_WRITE_INTERVAL", "-0.5"),
        ("CRAWLER_MAX_BODY_BYTES", "-1"),
        ("CRAWLER_MAX_REDIRECTS", "-1"),
    ],
)
def test_an_out_of_range_value_is_a_usage_error_naming_the_setting(variable: str, value: str) -> None:
    name = variable.removeprefix("CRAWLER_").lower()
    message = usage_error(environ={variable: value})
    assert f"'{name}'" in message
    assert_one_sentence(message)


def test_a_nan_timeout_is_a_usage_error() -> None:
    message = usage_error(environ={"CRAWLER_CONNECT_TIMEOUT": "nan"})
    assert "'connect_timeout'" in message


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ('concurrency = "many"\n', "concurrency"),
        ("concurrency = 2.5\n", "concurrency"),
        ("concurrency = true\n", "concurrency"),  # a bool is not an int here
        ("sort_query = 1\n", "sort_query"),
        ("user_agent = 5\n", "user_agent"),
        ('connect_timeout = "soon"\n', "connect_timeout"),
    ],
)
def test_a_wrongly_typed_toml_value_is_a_usage_error_naming_the_setting_and_file(
    tmp_path: Path, text: str, name: str
) -> None:
    config = write(tmp_path, text)
    message = usage_error(config_file=config, environ={})
    assert f"'{name}'" in message and str(config) in message
    assert_one_sentence(message)


@pytest.mark.parametrize(
    ("text", "name"),
    [('retry_statuses = ["429", "503"]\n', "retry_statuses"), ("allow_net = [1]\n", "allow_net")],
)
def test_a_toml_list_with_wrongly_typed_items_is_a_usage_error(tmp_path: Path, text: str, name: str) -> None:
    message = usage_error(config_file=write(tmp_path, text), environ={})
    assert f"'{name}'" in message


def test_an_unknown_key_in_a_config_file_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    config = write(tmp_path, "concurrency = 5\nconcurrancy = 6\n")
    message = usage_error(config_file=config, environ={})
    assert "'concurrancy'" in message and str(config) in message
    assert_one_sentence(message)


def test_a_table_in_a_config_file_is_an_unknown_key(tmp_path: Path) -> None:
    message = usage_error(config_file=write(tmp_path, "[crawler]\nconcurrency = 5\n"), environ={})
    assert "'crawler'" in message


def test_an_invalid_toml_file_is_a_usage_error(tmp_path: Path) -> None:
    config = write(tmp_path, "concurrency = = 5\n")
    message = usage_error(config_file=config, environ={})
    assert str(config) in message and "not valid TOML" in message
    assert message.endswith(".")


def test_a_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    message = usage_error(config_file=missing, environ={})
    assert str(missing) in message and "does not exist" in message
    assert_one_sentence(message)


def test_flags_are_validated_too() -> None:
    message = usage_error(environ={}, flags={"concurrency": 0})
    assert "'concurrency'" in message


# --- the settings object ----------------------------------------------------------------------


def test_workers_auto_is_one_per_core_and_zero_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert Settings().effective_workers() == 6
    assert Settings(workers="auto").effective_workers() == 6
    assert Settings(workers=3).effective_workers() == 3
    assert Settings(workers=0).effective_workers() == 0  # ingest and supervise; fetched elsewhere
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert Settings(workers="auto").effective_workers() == 1


@pytest.mark.parametrize(
    "source, value, expected",
    [
        ("flags", "auto", "auto"),
        ("flags", 0, 0),
        ("flags", 4, 4),
        ("environ", "AUTO", "auto"),
        ("environ", " 0 ", 0),
        ("environ", "2", 2),
    ],
)
def test_workers_takes_auto_or_a_count(source: str, value, expected) -> None:
    layer = {"flags": {"workers": value}} if source == "flags" else {"environ": {"CRAWLER_WORKERS": value}}
    settings, _ = load_settings(**{"environ": {}, **layer})
    assert settings.workers == expected


@pytest.mark.parametrize("value", ["many", "-1", 1.5, True])
def test_workers_refuses_anything_else(value) -> None:
    message = usage_error(
        environ={"CRAWLER_WORKERS": value} if isinstance(value, str) else {},
        flags={} if isinstance(value, str) else {"workers": value},
    )
    assert "'workers'" in message


def test_a_joining_worker_takes_the_jobs_policy_and_keeps_its_own_capacity() -> None:
    job = Settings(
        workers=0,
        concurrency=50,
        per_host_concurrency=4,
        max_attempts=5,
        allow_net=["10.0.0.0/8"],
        dsn=None,
        home="/srv/supervisor",
    ).as_dict()
    job["url_column"] = "link"  # stored with the job, not a setting
    local = Settings(
        workers=3,
        concurrency=400,
        per_host_concurrency=16,
        max_attempts=1,
        allow_net=["192.168.0.0/16"],
        dsn="postgresql://db/crawler",
        home="/here",
    )
    merged = for_job(job, local)
    assert (merged.workers, merged.concurrency, merged.dsn, merged.home) == (3, 400, "postgresql://db/crawler", "/here")
    assert (merged.per_host_concurrency, merged.max_attempts) == (4, 5)
    assert merged.allow_net == ["10.0.0.0/8", "192.168.0.0/16"]


def test_as_dict_has_every_key() -> None:
    assert set(Settings().as_dict()) == KEYS


# --- each kind's coercion and its message, word for word ------------------------------------------


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"CRAWLER_CONCURRENCY": "many"},
            "setting 'concurrency' from CRAWLER_CONCURRENCY must be a whole number, not 'many'.",
        ),
        (
            {"CRAWLER_CONNECT_TIMEOUT": "soon"},
            "setting 'connect_timeout' from CRAWLER_CONNECT_TIMEOUT must be a number, not 'soon'.",
        ),
        (
            {"CRAWLER_STORE_BODIES": "maybe"},
            "setting 'store_bodies' from CRAWLER_STORE_BODIES must be true or false, not 'maybe'.",
        ),
        (
            {"CRAWLER_RETRY_STATUSES": "429,x"},
            "setting 'retry_statuses' from CRAWLER_RETRY_STATUSES must be a list of whole numbers, not '429,x'.",
        ),
        (
            {"CRAWLER_WORKERS": "some"},
            "setting 'workers' from CRAWLER_WORKERS must be 'auto' or a whole number, not 'some'.",
        ),
    ],
)
def test_a_bad_environment_value_names_the_variable_the_kind_and_the_value(environ, message) -> None:
    assert usage_error(environ=environ, config_file=None) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("allow_net = [1]\n", "must be a list of strings, not [1]."),
        ("retry_statuses = [true]\n", "must be a list of whole numbers, not [True]."),
        ("user_agent = 5\n", "must be a string, not 5."),
    ],
)
def test_a_bad_toml_list_or_string_says_what_it_must_be(tmp_path: Path, text: str, message: str) -> None:
    assert usage_error(config_file=write(tmp_path, text), environ={}).endswith(message)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", True),
        ("0", False),
        ("true", True),
        ("FALSE", False),
        (" yes ", True),
        ("no", False),
        ("on", True),
        ("off", False),
    ],
)
def test_every_spelling_of_a_boolean_in_the_environment(text: str, expected: bool) -> None:
    settings, sources = load_settings(environ={"CRAWLER_STORE_BODIES": text})
    assert settings.store_bodies is expected and sources["store_bodies"] == "environment"


def test_the_cache_ttl_reads_a_duration_and_the_worker_count_auto_from_anywhere(tmp_path: Path) -> None:
    settings, _ = load_settings(environ={"CRAWLER_CACHE_TTL": "2h", "CRAWLER_WORKERS": "AUTO"})
    assert (settings.cache_ttl, settings.workers) == (7200.0, "auto")
    settings, _ = load_settings(config_file=write(tmp_path, 'cache_ttl = "90s"\nworkers = 3\n'), environ={})
    assert (settings.cache_ttl, settings.workers) == (90.0, 3)
    message = usage_error(config_file=write(tmp_path, "workers = true\n"), environ={})
    assert message == f"setting 'workers' from {tmp_path / 'crawler.toml'} must be 'auto' or a whole number, not True."


def test_a_list_setting_given_as_text_is_a_comma_list(tmp_path: Path) -> None:
    settings, _ = load_settings(config_file=write(tmp_path, 'allow_net = "10.0.0.0/8, 127.0.0.1/32"\n'), environ={})
    assert settings.allow_net == ["10.0.0.0/8", "127.0.0.1/32"]


def test_a_setting_that_may_be_absent_takes_none_from_a_flag() -> None:
    settings, sources = load_settings(environ={}, flags={"dsn": None, "concurrency": 7})
    assert settings.dsn is None and settings.concurrency == 7 and sources["concurrency"] == "flag"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"CRAWLER_METRICS_PORT": "65536"}, "setting 'metrics_port' must be a port number (0 = off), not 65536."),
        ({"CRAWLER_PER_HOST_MAX": "-1"}, "setting 'per_host_max' cannot be negative (0 means: no limit of its own)."),
        ({"CRAWLER_PER_HOST_RATE": "-0.5"}, "setting 'per_host_rate' cannot be negative (0 means: no rate limit)."),
        ({"CRAWLER_WORKER_RESTARTS": "-1"}, "setting 'worker_restarts' cannot be negative."),
        ({"CRAWLER_DRAIN_GRACE": "-1"}, "setting 'drain_grace' cannot be negative."),
        ({"CRAWLER_MAX_REDIRECTS": "-1"}, "settings 'max_body_bytes' and 'max_redirects' cannot be negative."),
        ({"CRAWLER_MAX_BODY_BYTES": "-1"}, "settings 'max_body_bytes' and 'max_redirects' cannot be negative."),
        ({"CRAWLER_ROBOTS_MAX_DELAY": "-0.5"}, "setting 'robots_max_delay' cannot be negative."),
        (
            {"CRAWLER_IDLE_HOSTS": "-1"},
            "setting 'idle_hosts' cannot be negative"
            " (0 means: close a host's connections once it has nothing pending).",
        ),
        ({"CRAWLER_DNS_CACHE_SIZE": "-1"}, "setting 'dns_cache_size' cannot be negative (0 means: no cache)."),
        (
            {"CRAWLER_DNS_SERVERS": "127.0.0.1:53,resolver.example"},
            "DNS server 'resolver.example' must be an IP address with an optional port,"
            " e.g. 127.0.0.1:5353 or [::1]:53.",
        ),
        ({"CRAWLER_CA_FILE": "/nonexistent/ca.pem"}, "the CA file '/nonexistent/ca.pem' does not exist."),
    ],
)
def test_each_bound_says_which_setting_and_why(environ, message) -> None:
    assert usage_error(environ=environ) == message


def test_the_edges_of_each_bound_are_allowed() -> None:
    edges = {
        "CRAWLER_METRICS_PORT": "65535",
        "CRAWLER_WORKER_RESTARTS": "0",
        "CRAWLER_MAX_BODY_BYTES": "0",
        "CRAWLER_MAX_REDIRECTS": "0",
        "CRAWLER_PER_HOST_RATE": "0",
        "CRAWLER_PER_HOST_MAX": "0",
    }
    settings, _ = load_settings(environ=edges)
    assert (settings.metrics_port, settings.worker_restarts, settings.max_body_bytes, settings.max_redirects) == (
        65535,
        0,
        0,
        0,
    )
    zeros = {
        "CRAWLER_ROBOTS_MAX_DELAY": "0",
        "CRAWLER_IDLE_HOSTS": "0",
        "CRAWLER_DNS_CACHE_SIZE": "0",
        "CRAWLER_DNS_SERVERS": "127.0.0.1:5353,[::1]",
    }
    settings, _ = load_settings(environ=zeros)
    assert (settings.robots_max_delay, settings.idle_hosts, settings.dns_cache_size) == (0, 0, 0)
    assert settings.dns_servers == ["127.0.0.1:5353", "[::1]"]


def test_the_embedded_database_lives_under_the_users_data_directory_for_the_crawler() -> None:
    import platformdirs

    from crawler.settings import Settings

    assert Settings().home == platformdirs.user_data_dir("crawler")


def test_a_joining_worker_keeps_its_own_networks_when_the_job_stored_none() -> None:
    from crawler.settings import Settings, for_job

    merged = for_job({"max_attempts": 5}, Settings(allow_net=["10.0.0.0/8"]))
    assert merged.allow_net == ["10.0.0.0/8"] and merged.max_attempts == 5


# --- frozen, and validated however it is made -----------------------------------------------------


def test_settings_are_frozen_and_a_change_is_a_new_object() -> None:
    settings = Settings(concurrency=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.concurrency = 6  # type: ignore[misc]
    changed = dataclasses.replace(settings, concurrency=6)
    assert (settings.concurrency, changed.concurrency) == (5, 6)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Settings(concurrency=0), "setting 'concurrency' must be at least 1, not 0."),
        (
            lambda: dataclasses.replace(Settings(), metrics_port=70000),
            "setting 'metrics_port' must be a port number (0 = off), not 70000.",
        ),
        (lambda: Settings(robots="sometimes"), "setting 'robots' must be 'obey' or 'ignore', not 'sometimes'."),
        (
            lambda: for_job({"max_attempts": "five"}, Settings()),
            "setting 'max_attempts' from the job's stored settings must be a whole number, not 'five'.",
        ),
        (lambda: for_job({"max_attempts": 0}, Settings()), "setting 'max_attempts' must be at least 1, not 0."),
        (
            lambda: Settings.from_values({"concurrency": "many"}, "the worker's orders"),
            "setting 'concurrency' from the worker's orders must be a whole number, not 'many'.",
        ),
        (
            lambda: Settings.from_values({"concurrency": 0}, "the worker's orders"),
            "setting 'concurrency' must be at least 1, not 0.",
        ),
        (
            lambda: Settings.from_values({"concurrancy": 5}, "the worker's orders"),
            "unknown setting 'concurrancy' from the worker's orders.",
        ),
        (
            lambda: Settings.from_values({"ca_file": None}, "the worker's orders"),
            "setting 'ca_file' from the worker's orders must be a string, not None.",
        ),
    ],
)
def test_every_way_of_making_settings_validates_them(make, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        make()
    assert str(caught.value) == message


def test_settings_handed_over_whole_come_back_equal() -> None:
    settings = Settings(
        workers=3,
        concurrency=7,
        cache_ttl=90.0,
        allow_net=["10.0.0.0/8"],
        retry_statuses=[503],
        dsn="postgresql://u@127.0.0.1/db",
        home="/srv/crawler",
    )
    assert Settings.from_values(settings.as_dict(), "the worker's orders") == settings
    assert Settings.from_values({"connect_timeout": 3}, "x").connect_timeout == 3.0  # JSON may drop the .0


def test_a_worker_handed_a_bad_setting_stops_with_the_sentence_before_it_connects() -> None:
    # Unchecked, the worker would start and wait out the unreachable database (0.1 s), exit 2.
    orders = {"concurrency": "many", "db_outage_limit": 0.1}
    code = f"from crawler.fetch.process import run_worker; run_worker('postgresql://127.0.0.1:1/none', 1, {orders!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, cwd=ROOT)
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "setting 'concurrency' from the worker's orders must be a whole number, not 'many'." in err


# --- the scope of each setting --------------------------------------------------------------------


def test_the_machine_keys_are_the_settings_declared_as_each_machines_own() -> None:
    # docs/SCALING.md lists these: what a machine joining a job keeps of its own.
    assert MACHINE_KEYS == {
        "dsn",
        "home",
        "workers",
        "concurrency",
        "idle_hosts",
        "metrics_port",
        "metrics_host",
        "progress_interval",
        "db_outage_limit",
        "ca_file",
        "dns_servers",
    }
    assert {name for name, d in DECLARATIONS.items() if d.scope is Scope.MERGED} == {"allow_net"}


def test_a_flag_is_named_for_its_setting_unless_declared_otherwise() -> None:
    assert flag_name("per_host_rate") == "--per-host-rate"
    assert flag_name("adaptive_concurrency") == "--no-adaptive"
    assert flag_name("dns_servers") == "--dns-server"


def test_a_ca_file_that_exists_is_taken(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")  # read by the fetcher, not here: here only found
    settings, _ = load_settings(environ={"CRAWLER_CA_FILE": str(ca)})
    assert settings.ca_file == str(ca)


def test_the_small_value_objects_are_read_from_the_settings() -> None:
    from crawler.settings import HostBudget, Settings, Timeouts, WriterSettings

    s = Settings(
        connect_timeout=3.0,
        read_timeout=7.0,
        total_timeout=11.0,
        write_batch=250,
        write_interval=0.25,
        lease_seconds=45.0,
        concurrency=40,
        per_host_concurrency=6,
        per_host_max=9,
        per_host_rate=3.0,
    )
    assert s.timeouts == Timeouts(connect=3.0, read=7.0, total=11.0)
    assert s.writer == WriterSettings(batch_size=250, interval=0.25, lease_seconds=45.0)
    # A job's per-host limits are shared by its live workers, never below one request in flight.
    assert s.host_budget(1) == HostBudget(initial=6, maximum=9, rate=3.0)
    assert s.host_budget(4) == HostBudget(initial=1, maximum=2, rate=0.75)
    # 0 = no limit of its own: the worker's concurrency bounds a host.
    unlimited = Settings(concurrency=40, per_host_concurrency=0, per_host_max=0, per_host_rate=0.0)
    assert unlimited.host_budget(3) == HostBudget(initial=40, maximum=40, rate=0.0)
