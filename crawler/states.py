"""The states of a job and of a chunk, defined once; migrations/001_initial.sql's CHECK
constraints allow exactly these (tests/test_ledger_states.py holds the two together). A member is
its string (StrEnum), so it is stored and compared as the plain text the ledger holds.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    INGESTING = "ingesting"  # the supervisor is still storing the input as chunks
    RUNNING = "running"  # every chunk stored; workers fetch them
    DONE = "done"  # every row has its terminal state
    INTERRUPTED = "interrupted"  # stopped before done; `crawler resume` finishes it


class ChunkState(StrEnum):
    PENDING = "pending"  # waiting for a worker
    LEASED = "leased"  # a worker holds it until its lease expires
    DONE = "done"  # every row has a result (a quarantined chunk too: chunks.quarantined says why)
