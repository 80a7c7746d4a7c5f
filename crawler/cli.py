"""The `crawler` command: parses arguments and delegates. Every user-facing error is one plain
sentence on stderr and an exit code: 0 done, 1 usage or input error, 2 infrastructure error,
130 interrupted and resumable."""

from __future__ import annotations

import argparse
import os
import sys
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from crawler.errors import EXIT_INTERRUPTED, CrawlerError, UsageError
from crawler.mock.options import add_server_flags

if TYPE_CHECKING:  # imported where used: `crawler --help` stays quick
    from crawler.job.standby import Standby
    from crawler.settings import Declaration, Reach, Settings

EXAMPLES = {  # each `crawler ...` line must parse: tests/test_cli.py checks every one
    "crawler": (
        "examples:\n"
        "  crawler crawl urls.csv --job-name weekly          # every outcome into PostgreSQL (embedded without --dsn)\n"
        "  crawler export weekly --format csv -o results.csv\n"
        "  crawler resume weekly                             # after Ctrl-C, a crash or kill -9\n"
        "  crawler retry weekly                              # later: fetch its timeouts and 503s again\n"
        "\n"
        "exit codes:\n"
        "  0    done (failed fetches are results, not a failed job)\n"
        "  1    usage or input error (a bad flag, a missing file or URL column)\n"
        "  2    infrastructure error (the database unreachable, workers that keep dying)\n"
        "  130  interrupted and resumable: `crawler resume JOB` finishes the job\n"
        "\n"
        "`crawler COMMAND --help` shows a command's options and examples."
    ),
    "crawl": (
        "examples:\n"
        "  crawler crawl urls.csv --job-name weekly          # a CSV with a url column, one URL a line, or .gz\n"
        "  crawler crawl others.txt --robots obey            # read and obey each host's robots.txt\n"
        "  cat urls.txt | crawler crawl - --concurrency 500 --metrics-port 9100\n"
        "  crawler crawl big.csv.gz --dsn postgresql://crawler@db.internal/crawler --workers 0 --job-name big\n"
        "      # --workers 0: ingest and supervise only; `crawler worker` on other machines fetches"
    ),
    "resume": (
        "examples:\n"
        "  crawler resume weekly                             # by name, after Ctrl-C, a crash or kill -9\n"
        "  crawler resume 42 --workers 8 --concurrency 400   # by id, with this machine's own capacity\n"
        "\n"
        "The job runs with the policy it was started with (retries, timeouts, politeness, cache,\n"
        "allowed networks); --allow-net adds to its list, and a policy flag that would change it is refused."
    ),
    "retry": (
        "examples:\n"
        "  crawler retry weekly                              # timeout, connect, reset, dns, and 429/502/503/504\n"
        "  crawler retry weekly --status 5xx                 # the same kinds, and every 5xx answer\n"
        "  crawler retry weekly --kinds timeout --workers 8  # timeouts only, with more capacity here\n"
        "  crawler retry 42 --kinds blocked --allow-net 10.0.0.0/8   # rows refused before 10/8 was allowed\n"
        "  crawler retry weekly --kinds internal             # rows of a quarantined chunk\n"
        "\n"
        "Default: the transient failures, the kinds timeout, connect, reset and dns, and http_status answers\n"
        "whose status the job retries (its retry_statuses: {retry_statuses} unless set otherwise). Only a\n"
        "finished job; its policy applies; interrupted, `crawler resume JOB` finishes it."
    ),
    "worker": (
        "examples:\n"
        "  crawler worker --dsn postgresql://crawler@db.internal/crawler --job big\n"
        "      # join job `big` from this machine, leave when it is done\n"
        "  crawler worker --dsn postgresql://crawler@db.internal/crawler --workers 8 --concurrency 400\n"
        "      # no --job: wait for the next unfinished job, fetch it, then leave\n"
        "  crawler worker --job big --metrics-port 9100      # DSN from CRAWLER_DSN; Prometheus on :9100"
    ),
    "export": (
        "examples:\n"
        "  crawler export weekly --format jsonl -o results.jsonl\n"
        "  crawler export 42 --format csv --only failed > failed.csv\n"
        "  crawler export weekly --format parquet -o results.parquet   # needs pip install 'crawler[parquet]'"
    ),
    "status": (
        "examples:\n"
        "  crawler status                                    # the latest job\n"
        "  crawler status weekly --json                      # counts, rate, ETA, errors by kind, live workers"
    ),
    "jobs": "example:\n  crawler jobs                                      # id, name, state, rows read, results",
    "migrate": (
        "examples:\n"
        "  crawler migrate                                   # the embedded database\n"
        "  crawler migrate --dsn postgresql://crawler@db.internal/crawler   # an external server"
    ),
    "db": 'examples:\n  crawler db url\n  psql "$(crawler db url --show-password)"\n  crawler db stop',
    "db url": (
        "examples:\n"
        "  crawler db url                                    # the DSN in use, password masked\n"
        '  psql "$(crawler db url --show-password)"          # query the results directly'
    ),
    "db stop": "example:\n  crawler db stop                                   # the next command starts it again",
    "bench": (
        "examples:\n"
        "  crawler bench --urls 100000 --workers 2 --concurrency 200\n"
        "  crawler bench --urls 100000 --duplicates 0.3      # 30 % repeats, each fetched once\n"
        "  crawler bench --urls 50000 --latency-ms 100 --concurrency 400 --server-processes 2\n"
        "  crawler bench --urls 100000 --hosts 10000 --tls  # 10 000 host names over HTTPS, resolved on loopback"
    ),
    "mock-server": (
        "examples:\n"
        "  crawler mock-server --port 8080 --processes 4     # then: curl http://127.0.0.1:8080/delay/100/x\n"
        "  crawler mock-server --seed 7 --capacity 20        # 503 above 20 requests in flight per process\n"
        "  crawler mock-server --tls --ca-out ca.pem         # then: crawler crawl urls.txt --ca-file ca.pem\n"
        "  python -m crawler.mock.server --help              # the table of paths and what each answers"
    ),
    "config": (
        "examples:\n"
        "  crawler config show                               # every setting, its value and where it came from\n"
        "  crawler config show --config crawl.toml           # with a file layered over config/default.toml"
    ),
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one sentence and exit 1, not argparse's exit 2
        raise UsageError(f"{message}; see `{self.prog} --help`.")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' cannot be negative")
    return value


MAX_JOB_NAME = 200


def _job_name(text: str) -> str:
    """A name that refers to one job and prints as itself: not all digits (`crawler status 42`
    would find the name before the job with id 42), not blank, no control or format characters
    (a name is printed by `status`, `jobs` and the summary, and a terminal obeys them)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("a job name cannot be empty")
    if text.isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is all digits, which is how jobs are referred to by id")
    if any(unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") for char in text):
        raise argparse.ArgumentTypeError(f"{text!r} holds control characters")
    if len(text) > MAX_JOB_NAME:
        raise argparse.ArgumentTypeError(f"a job name can have at most {MAX_JOB_NAME} characters")
    return text


def _workers(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else _positive(text)


def _add_setting_flags(parser: argparse.ArgumentParser, reach: Reach, *, machine_only: bool = False) -> None:
    """The flags of the settings that `reach` these commands, each as Settings declares it: its
    name, its help with the dataclass's default, a switch for a bool, repeated for a list.
    `machine_only`: a joining worker's, whose policy is the job's (a merged list adds to it)."""
    from crawler.settings import DECLARATIONS, Scope

    for declared in DECLARATIONS.values():
        flag = declared.flag
        if flag is None or flag.reach != reach or (machine_only and declared.scope is Scope.POLICY):
            continue
        shown = _shown_default(declared)
        help_text = declared.help if shown is None else f"{declared.help} (default: {shown})"
        options: dict[str, Any] = {"dest": declared.name, "help": help_text.replace("%", "%%")}
        if declared.kind is bool:  # a switch: it turns the setting to the opposite of its default
            options.update(action="store_false" if declared.default else "store_true", default=None)
        else:
            options.update(metavar=flag.metavar, choices=declared.choices or None)
            if declared.kind is list:
                options["action"] = "append"
            elif declared.name == "workers":
                options["type"] = _workers
            elif not flag.text:  # text is parsed by the settings (a duration); numbers here, in argparse's words
                options["type"] = {int: _positive, float: float}.get(declared.kind)
        parser.add_argument(declared.flag_name, **options)


def _shown_default(declared: Declaration) -> str | None:
    """A flag's default as its help shows it; none for a switch or for nothing set."""
    value = declared.default
    if declared.kind is bool or value in (None, "", []):
        return None
    if isinstance(value, list):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def build_parser() -> Parser:
    from crawler.settings import DECLARATIONS, Reach

    common = Parser(add_help=False)
    _add_setting_flags(common, Reach.EVERY)
    common.add_argument("--config", metavar="FILE", help="a TOML file layered over config/default.toml")
    common.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    common.add_argument("--log-format", default="text", choices=["text", "json"])

    tuning = Parser(add_help=False)  # what every command that runs a job takes
    _add_setting_flags(tuning, Reach.RUN)
    tuning.add_argument("--quiet", action="store_true", help="no progress and no summary table")
    tuning.add_argument("--summary-json", metavar="PATH", help="write the job's summary as JSON to PATH")
    starting = Parser(add_help=False)  # what only a new job decides
    _add_setting_flags(starting, Reach.START)
    joining = Parser(add_help=False)  # what a worker joining a job decides for this machine
    _add_setting_flags(joining, Reach.RUN, machine_only=True)

    parser = Parser(
        prog="crawler",
        description="A massive asynchronous HTTP crawler: every outcome in PostgreSQL.",
        epilog=EXAMPLES["crawler"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "crawl",
        parents=[common, tuning, starting],
        help="crawl a CSV, text or gzip file of URLs",
        epilog=EXAMPLES["crawl"],
        formatter_class=fmt,
    )
    p.add_argument("input", help="CSV with a header, a text file of URLs, either gzipped, or - for stdin")
    p.add_argument("--url-column", metavar="NAME", help="the CSV column holding the URL (default: url)")
    p.add_argument(
        "--job-name",
        type=_job_name,
        metavar="NAME",
        help="a unique name to refer to the job by (not all digits: those are job ids)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="if this input (or --job-name) has an unfinished job, finish it instead of starting anew,"
        " with its own policy (as `crawler resume`: a flag that would change it is refused)",
    )

    p = sub.add_parser(
        "resume",
        parents=[common, tuning],
        help="finish an interrupted job",
        epilog=EXAMPLES["resume"],
        formatter_class=fmt,
    )
    p.add_argument("job", help="the job's id or name")

    retry_statuses = ", ".join(map(str, DECLARATIONS["retry_statuses"].default))
    p = sub.add_parser(
        "retry",
        parents=[common, tuning],
        help="fetch again the failed rows of a finished job",
        epilog=EXAMPLES["retry"].format(retry_statuses=retry_statuses),
        formatter_class=fmt,
    )
    p.add_argument("job", help="the job's id or name")
    p.add_argument(
        "--kinds", metavar="K,...", help="error kinds to fetch again (default: timeout,connect,reset,dns,http_status)"
    )
    p.add_argument(
        "--status",
        metavar="S,...",
        help="http_status answers to fetch again, by code or class: 503,5xx (default: the job's"
        " retry_statuses, when http_status is among the kinds by default)",
    )

    p = sub.add_parser(
        "worker",
        parents=[common, joining],
        help="fetch a job's chunks from this machine (or wait for the next job)",
        epilog=EXAMPLES["worker"],
        formatter_class=fmt,
    )
    p.add_argument("--job", help="the job's id or name (default: the oldest unfinished job, waiting for one)")

    p = sub.add_parser(
        "export",
        parents=[common],
        help="write a job's outcomes, one record per input row",
        epilog=EXAMPLES["export"],
        formatter_class=fmt,
    )
    p.add_argument("job", help="the job's id or name")
    p.add_argument(
        "--format",
        choices=["jsonl", "csv", "parquet"],
        default="jsonl",
        help="jsonl (default), csv, or parquet (needs pyarrow and -o PATH)",
    )
    p.add_argument("-o", "--output", metavar="PATH", help="file to write (default: stdout; parquet needs a file)")
    p.add_argument("--only", choices=["ok", "failed", "invalid"], help="export only these rows")
    p.add_argument(
        "--csv-raw",
        action="store_true",
        help="csv: write every cell as stored, for programs; by default a cell starting with"
        " = + - @ tab or CR is prefixed with ' so that a spreadsheet shows it, not runs it",
    )

    p = sub.add_parser(
        "status", parents=[common], help="a job's state and counts", epilog=EXAMPLES["status"], formatter_class=fmt
    )
    p.add_argument("job", nargs="?", help="the job's id or name (default: the latest job)")
    p.add_argument("--json", action="store_true")

    sub.add_parser(
        "jobs",
        parents=[common],
        help="list jobs with their state and counts",
        epilog=EXAMPLES["jobs"],
        formatter_class=fmt,
    )
    sub.add_parser(
        "migrate",
        parents=[common],
        help="apply database migrations (also done automatically)",
        epilog=EXAMPLES["migrate"],
        formatter_class=fmt,
    )

    p = sub.add_parser("db", parents=[common], help="the database in use", epilog=EXAMPLES["db"], formatter_class=fmt)
    dbsub = p.add_subparsers(dest="db_command", required=True, parser_class=Parser)
    q = dbsub.add_parser(
        "url",
        parents=[common],
        help="print the DSN in use (password masked)",
        epilog=EXAMPLES["db url"],
        formatter_class=fmt,
    )
    q.add_argument("--show-password", action="store_true")
    dbsub.add_parser(
        "stop", parents=[common], help="stop the embedded PostgreSQL", epilog=EXAMPLES["db stop"], formatter_class=fmt
    )

    p = sub.add_parser(
        "bench",
        parents=[common, tuning, starting],
        help="load-test the whole path against the mock server",
        epilog=EXAMPLES["bench"],
        formatter_class=fmt,
    )
    p.add_argument("--urls", type=_positive, default=10000, help="how many URLs to generate (default 10000)")
    p.add_argument("--duplicates", type=float, default=0.0, help="fraction of repeated URLs (default 0)")
    p.add_argument("--latency-ms", type=_positive, default=0, help="mock server latency per request (default 0)")
    p.add_argument("--server-processes", type=_positive, default=1, help="mock server processes (default 1)")
    p.add_argument(
        "--hosts",
        type=_positive,
        default=1,
        metavar="N",
        help="spread the URLs over N host names (h<i>.bench.test), resolved by a DNS responder on"
        " loopback (default 1: 127.0.0.1 itself)",
    )
    p.add_argument("--tls", action="store_true", help="HTTPS: the mock server's certificate, trusted with --ca-file")

    p = sub.add_parser(
        "mock-server",
        help="a local HTTP server for tests and load tests",
        epilog=EXAMPLES["mock-server"],
        formatter_class=fmt,
    )
    add_server_flags(p)

    p = sub.add_parser(
        "config", parents=[common], help="the effective configuration", epilog=EXAMPLES["config"], formatter_class=fmt
    )
    p.add_argument("action", choices=["show"])
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags: every flag of a setting has the setting's name as its dest."""
    from crawler.settings import KEYS

    return {name: value for name in KEYS if (value := getattr(args, name, None)) is not None}


def _run(coro) -> int:
    import uvloop

    return uvloop.run(coro)


def dispatch(args: argparse.Namespace) -> int:
    from crawler.job.standby import Standby
    from crawler.settings import load_settings

    if args.command == "mock-server":
        from crawler.mock.behaviours import robots_knob
        from crawler.mock.server import serve

        try:
            robots_knob(args.robots)
        except ValueError as exc:
            raise UsageError(f"{exc}.") from None

        serve(
            host=args.host,
            port=args.port,
            processes=max(1, args.processes),
            seed=args.seed,
            capacity=args.capacity,
            count_paths=args.count_paths,
            robots=args.robots,
            tls=args.tls,
            ca_file=args.ca_out,
            report=args.report,
        )
        return 0
    settings, sources = load_settings(config_file=args.config, flags=_flags(args))
    if args.command == "bench" and settings.effective_workers() == 0:
        raise UsageError("bench measures this machine's workers: --workers must be auto or at least 1.")
    if settings.ca_file:
        from crawler.fetch.fetcher import tls_context

        tls_context(settings)  # a file that is not PEM: one sentence here, not a failure in every worker
    # The commands that run a job start their workers first of all: they import while this
    # process imports its own modules and prepares the database and the job (standby.py).
    starts_job = args.command in ("crawl", "resume", "retry", "bench")
    with Standby(settings.effective_workers() if starts_job else 0) as standby:
        return _dispatch(args, settings, sources, standby)


def _dispatch(args: argparse.Namespace, settings: Settings, sources: dict[str, str], standby: Standby) -> int:
    from crawler import commands

    if args.command == "config":
        return commands.show_config(settings, sources)
    if args.command == "db" and args.db_command == "stop":
        return commands.db_stop(settings)
    dsn = commands.resolve(settings)
    if args.command == "db":
        return commands.db_url(dsn, show_password=args.show_password)
    if args.command == "crawl":
        from crawler.job.crawl import crawl

        return _run(
            crawl(
                dsn,
                settings,
                input_path=args.input,
                url_column=args.url_column,
                job_name=args.job_name,
                summary_json=args.summary_json,
                quiet=args.quiet,
                resume_existing=args.resume,
                standby=standby,
                sources=sources,
            )
        )
    if args.command == "bench":
        from crawler.mock.bench import bench

        return _run(
            bench(
                dsn,
                settings,
                urls=args.urls,
                duplicates=args.duplicates,
                latency_ms=args.latency_ms,
                server_processes=max(1, args.server_processes),
                summary_json=args.summary_json,
                quiet=args.quiet,
                standby=standby,
                hosts=max(1, args.hosts),
                tls=args.tls,
            )
        )
    if args.command == "resume":
        from crawler.job.crawl import resume

        return _run(
            resume(
                dsn,
                settings,
                job_ref=args.job,
                summary_json=args.summary_json,
                quiet=args.quiet,
                standby=standby,
                sources=sources,
            )
        )
    if args.command == "retry":
        from crawler.job.crawl import retry

        return _run(
            retry(
                dsn,
                settings,
                job_ref=args.job,
                kinds=args.kinds,
                statuses=args.status,
                summary_json=args.summary_json,
                quiet=args.quiet,
                standby=standby,
                sources=sources,
            )
        )
    if args.command == "worker":
        return commands.worker(dsn, settings, args.job)
    if args.command == "export":
        return _run(
            commands.export(dsn, args.job, fmt=args.format, path=args.output, only=args.only, csv_raw=args.csv_raw)
        )
    if args.command == "status":
        return _run(commands.status(dsn, args.job, as_json=args.json, heartbeat_seconds=settings.heartbeat_seconds))
    if args.command == "jobs":
        return _run(commands.jobs(dsn))
    if args.command == "migrate":
        return _run(commands.migrate(dsn))
    raise UsageError(f"unknown command '{args.command}'.")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        from crawler.logs import setup_logging

        setup_logging(
            args.log_level if hasattr(args, "log_level") else "WARNING",
            args.log_format if hasattr(args, "log_format") else "text",
        )
        return dispatch(args)
    except CrawlerError as exc:
        sentence = str(exc).rstrip()
        print(f"crawler: {sentence}{'' if sentence.endswith(('.', '!', '?')) else '.'}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("crawler: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # `crawler export | head`
        return 0


def run() -> None:
    """The `crawler` program: main(), then the process ends. Everything allocated so far is
    frozen out of the garbage collector first: the interpreter's teardown collects all it holds
    again and again, about 0.1 s of CPU after a crawl, with the work already done."""
    code = main()
    import gc

    gc.freeze()
    raise SystemExit(code)
