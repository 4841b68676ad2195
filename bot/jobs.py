"""Jobs, their results and community sessions as the bot stores them (no MLX, no discord.py, no core).

Two lengths, two names: a job's ``new_seconds`` is the new audio the member asked for (all of a /music clip, what
Extend and /continue add); ``prompt_seconds`` is the audio it continues (0 for a fresh clip); ``total_seconds`` is
both, the length the model generates (:class:`core.GenerationRequest`'s ``seconds``).
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# An interaction token allows followups and edits for 15 minutes; keep a margin for the upload itself.
INTERACTION_TOKEN_LIFETIME = 15 * 60
TOKEN_SAFETY_MARGIN = 60

SEED_LIMIT = 2**32
MAX_JOB_ID = 2**63 - 1  # SQLite's largest INTEGER: a larger id (from a forged button) names no job


def new_seed() -> int:
    """A random seed, chosen before a job is queued so that a restart regenerates the same clip."""
    return secrets.randbelow(SEED_LIMIT)


class JobKind(str, Enum):
    """What a job makes: a clip from a prompt, or one made from an earlier clip (buttons, /continue)."""

    MUSIC = "music"  # /music
    REGENERATE = "regenerate"  # same prompt as the parent, a new seed
    VARIATION = "variation"  # same prompt and seed as the parent, temperature x VARIATION_TEMPERATURE
    EXTEND = "extend"  # the parent's tokens continued by ``new_seconds``
    CONTINUE = "continue"  # a member's uploaded audio continued by ``new_seconds``


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
    new_seconds: int  # new audio asked for (the whole clip for /music)
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
    prompt_seconds: float = 0.0  # EXTEND/CONTINUE: length of the audio continued (0 for a fresh clip)
    melody_path: str | None = None  # melody models: the decoded tune (/music melody:), an .npz like an upload
    melody_name: str | None = None  # the tune's file name, shown with the clip
    delivering_at: float | None = None  # when the first attempt to post the clip began (see delivery_nonce)
    worker_id: str | None = None  # the worker that holds a running job (its lease), None when queued
    lease_until: float | None = None  # a running job's lease ends then unless its worker renews it
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
    def delivery_nonce(self) -> str:
        """The ``nonce`` the clip's channel message carries: the same for every attempt to deliver this job, so
        Discord (``enforce_nonce``) answers a repeat within a few minutes with the message already posted."""
        return f"clip-{self.id}"  # Discord takes at most 25 characters

    @property
    def total_seconds(self) -> float:
        """The length of the clip the model makes: the audio continued plus the new part."""
        return self.prompt_seconds + self.new_seconds

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


@dataclass(frozen=True)
class ClipData:
    """A finished clip as the worker hands it back: ``samples`` ``(n, channels)`` float32 at ``sampling_rate``,
    the seed it was made with and its EnCodec ``tokens`` ``(codebooks, frames)`` (kept for Extend)."""

    samples: np.ndarray
    sampling_rate: int
    seed: int | None = None
    tokens: np.ndarray | None = None

    @property
    def seconds(self) -> float:
        return self.samples.shape[0] / self.sampling_rate


@dataclass
class JobResult:
    """How one job of a batch ended: ``DONE`` with a clip, ``FAILED`` with an error, or ``CANCELLED``."""

    job: Job
    status: JobStatus
    clip: ClipData | None = None
    error: str | None = None
    elapsed: float = 0.0


# -- the files a job continues from ---------------------------------------------------------------------
class ClipDataGone(LookupError):
    """The files a job needs (an earlier clip's tokens, an upload) are no longer on disk."""


def tokens_file(files_dir: Path, job_id: int) -> Path:
    """Where a finished job's EnCodec tokens ``(codebooks, frames)`` are kept (for Extend)."""
    return files_dir / f"{job_id}.npy"


def save_tokens(files_dir: Path, job_id: int, tokens: np.ndarray) -> Path:
    """Keep a finished clip's tokens; written to a temporary name first so a crash never leaves half a file."""
    files_dir.mkdir(parents=True, exist_ok=True)
    path = tokens_file(files_dir, job_id)
    partial = path.with_suffix(".partial.npy")
    np.save(partial, np.asarray(tokens, dtype=np.int16 if np.max(tokens, initial=0) < 2**15 else np.int32))
    partial.replace(path)
    return path


def save_upload(files_dir: Path, samples: np.ndarray, sampling_rate: int) -> Path:
    """Keep a member's decoded upload for the worker thread (and for Regenerate/Variation of its continuation),
    under a new random name: it is written before the job is queued, so the job can name it."""
    files_dir.mkdir(parents=True, exist_ok=True)
    path = files_dir / f"upload-{secrets.token_hex(8)}.npz"
    with open(path, "wb") as f:
        np.savez(f, samples=np.asarray(samples, dtype=np.float32), sampling_rate=np.int64(sampling_rate))
    return path


def load_tokens(path: str | Path | None) -> np.ndarray:
    """The tokens kept at ``path``; :class:`ClipDataGone` when they are missing or unreadable."""
    if not path:
        raise ClipDataGone("no tokens were kept for this clip")
    try:
        tokens = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ClipDataGone(f"the tokens of this clip are gone ({exc})") from exc
    return tokens.astype(np.int32)


def load_upload(path: str | Path | None) -> tuple[np.ndarray, int]:
    """The decoded upload kept at ``path`` as ``(samples, sampling_rate)``; :class:`ClipDataGone` if missing."""
    if not path:
        raise ClipDataGone("no audio was kept for this request")
    try:
        with np.load(path, allow_pickle=False) as data:
            return np.asarray(data["samples"], dtype=np.float32), int(data["sampling_rate"])
    except (OSError, ValueError, KeyError) as exc:
        raise ClipDataGone(f"the uploaded audio is gone ({exc})") from exc
