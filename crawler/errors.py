"""The crawler's own exceptions: each user-facing one carries one plain sentence and an exit code.

Errors of a *request* are never exceptions that escape a worker; they are data (see fetcher.py).
"""

EXIT_OK = 0
EXIT_USAGE = 1  # a bad flag, file or input
EXIT_INFRA = 2  # the database or another piece of infrastructure failed
EXIT_INTERRUPTED = 130  # stopped by the user; the job is resumable


class CrawlerError(Exception):
    """A failure the user can act on; str(error) is the sentence shown to them."""

    exit_code = EXIT_USAGE


class UsageError(CrawlerError):
    """A flag, argument or configuration value is wrong."""


class InputError(CrawlerError):
    """The input file is missing, unreadable or lacks what the crawl needs."""


class DatabaseError(CrawlerError):
    """PostgreSQL could not be reached or refused what the crawler asked of it."""

    exit_code = EXIT_INFRA


class JobNotFound(CrawlerError):
    """No job with the given id or name exists."""


class OutputError(CrawlerError):
    """A file the crawler was asked to write cannot be written (a directory, a missing directory,
    a full disk, a read-only place)."""
