"""Jobs and community sessions as the bot stores them."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from enum import Enum

# An interaction token allows followups and edits for 15 minutes; keep a margin for the upload itself.
INTERACTION_TOKEN_LIFETIME = 15 * 60
TOKEN_SAFETY_MARGIN = 60

SEED_LIMIT = 2**32


def new_seed() -> int:
    """A random seed, chosen before a job is queued so that a restart regenerates the same clip."""
    return secrets.randbelow(SEED_LIMIT)


class JobKind(str, Enum):
    """What a job makes: a clip from a prompt, or one made from an earlier clip (buttons, /continue)."""

    MUSIC = "music"  # /music
    REGENERATE = "regenerate"  # same prompt as the parent, a new seed
    VARIATION = "variation"  # same prompt and seed as the parent, temperature x VARIATION_TEMPERATURE
    EXTEND = "extend"  # the parent's tokens continued by ``seconds``
    CONTINUE = "continue"  # a member's uploaded audio continued by ``seconds``


# A variation keeps the parent's prompt *and seed* (so the same random draws) and samples 10% hotter: it stays close
# to the parent in character and drifts from it as the clip goes on.
VARIATION_TEMPERATURE = 1.1
MAX_TEMPERATURE = 2.0


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNDELIVERABLE = "undeliverable"

    @property
    def pending(self) -> bool:
        """Queued or running: the job still has to be generated or delivered."""
        return self in (JobStatus.QUEUED, JobStatus.RUNNING)

    @property
    def final(self) -> bool:
        return not self.pending


@dataclass
class Job:
    """One /music request. ``id`` is 0 until :meth:`bot.store.JobStore.add` gives it one."""

    guild_id: int | None
    channel_id: int
    user_id: int
    user_name: str
    prompt: str
    model_prompt: str
    seconds: int
    seed: int
    session_id: int | None = None
    status: JobStatus = JobStatus.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    interaction_id: int | None = None
    interaction_token: str | None = field(default=None, repr=False)
    application_id: int | None = None
    interaction_created_at: float | None = None
    status_message_id: int | None = None
    delivered_message_id: int | None = None
    delivered_url: str | None = None
    error: str | None = None
    format: str = "wav"
    attempts: int = 0  # how many times generation started (a restart mid-generation makes it > 1)
    kind: JobKind = JobKind.MUSIC
    parent_id: int | None = None  # the job whose clip a button was clicked on
    temperature: float = 1.0
    prompt_tokens_path: str | None = None  # EXTEND: the parent's tokens (codebooks, frames), an .npy file
    prompt_audio_path: str | None = None  # CONTINUE: the decoded upload, an .npz file (samples, sampling_rate)
    upload_limit: int | None = None  # bytes a file may have where the clip is delivered (interaction.filesize_limit)
    id: int = 0

    def __post_init__(self) -> None:
        self.status = JobStatus(self.status)
        self.kind = JobKind(self.kind)

    def token_alive(self, now: float | None = None, *, margin: float = TOKEN_SAFETY_MARGIN) -> bool:
        """Whether the interaction token can still be used for a followup or an edit."""
        if not self.interaction_token or self.interaction_created_at is None:
            return False
        now = time.time() if now is None else now
        return now < self.interaction_created_at + INTERACTION_TOKEN_LIFETIME - margin

    @property
    def lane(self) -> tuple[str, int]:
        """The queue lane: a whole session shares one lane, a member outside sessions has their own."""
        return ("session", self.session_id) if self.session_id is not None else ("user", self.user_id)


class SessionStatus(str, Enum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass
class Session:
    """A community generation session: a thread whose /music requests share a theme and one queue lane."""

    guild_id: int | None
    channel_id: int
    thread_id: int | None
    host_id: int
    theme: str = ""
    default_seconds: int | None = None
    status: SessionStatus = SessionStatus.OPEN
    created_at: float = field(default_factory=time.time)
    closed_at: float | None = None
    id: int = 0

    def __post_init__(self) -> None:
        self.status = SessionStatus(self.status)

    @property
    def open(self) -> bool:
        return self.status is SessionStatus.OPEN
