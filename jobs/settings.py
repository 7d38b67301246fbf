"""Settings of the API and the workers: one pydantic-settings class, `DISA_` environment names.

Read lazily through `get_settings()` (cached); tests change the environment and
call `get_settings.cache_clear()`. The API and every worker must see the same
jobs folder and broker, so in a deployment they share one environment file.
"""

from __future__ import annotations

from functools import cached_property, lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from disa.jobs.keys import ApiKey, parse_api_keys

# Redis re-delivers an unacknowledged message after the visibility timeout. It
# must exceed the hard time limit, or a long job that is still running would be
# handed to a second worker; the margin covers a job waiting in a prefetch slot.
VISIBILITY_MARGIN_S = 600


class Settings(BaseSettings):
    """Everything an operator can set. Sizes in bytes, durations in seconds."""

    model_config = SettingsConfigDict(env_prefix="DISA_", extra="ignore")

    broker_url: str | None = Field(
        None, description="Redis URL of the Celery broker; unset: embedded worker in the API")
    result_backend: str | None = Field(
        None, description="Celery result backend (optional: the job folder is the record)")
    jobs_dir: Path = Field(Path("disa-jobs"), description="shared folder of job folders")
    queue: str = Field("disa", description="Celery queue the API sends jobs to")
    api_keys: str = Field(
        "", description="accepted API keys, comma-separated, each as DIGEST, NAME=DIGEST or "
                        "NAME=DIGEST:admin (DIGEST: SHA-256 hex of the key); a job belongs to "
                        "the key that made it, admin keys see every job; empty: no "
                        "authentication (a warning is logged)")
    max_upload_bytes: int = Field(2 * 1024**3, ge=1, description="whole request body, bytes")
    max_voxels: int = Field(512**3, ge=64, description="voxels per input image")
    retention_days: float = Field(
        7.0, ge=0.0, description="finished jobs are deleted after this many days (0: never)")
    soft_time_limit_s: int = Field(1800, ge=1, description="a job fails after this long")
    hard_time_limit_s: int = Field(
        1900, ge=1, description="the worker process running a job is killed after this long")
    max_attempts: int = Field(
        3, ge=1, description="runs of one job (worker lost, storage errors) before it fails")
    sweep_interval_s: float = Field(
        30.0, gt=0.0, description="period of cleanup, lost-job recovery and metrics refresh")
    ready_cache_s: float = Field(5.0, ge=0.0, description="how long /readyz reuses its checks")
    upload_idle_timeout_s: float = Field(
        60.0, gt=0.0, le=3600.0,
        description="an upload whose body sends nothing for this long is answered 408 and "
                    "its staging folder removed")
    max_concurrent_uploads: int = Field(
        4, ge=1, le=1000,
        description="uploads in progress at once per API key (per API process); 429 past it")
    unpack_pool_bytes: int = Field(
        8 * 1024**3, ge=1024**2,
        description="bytes of DICOM zips decompressed or lying unpacked at once, per process "
                    "(API and each worker process): header checks of uploads hold each member "
                    "while reading it, a job's read its unpacked series; a zip needing more "
                    "is refused (422), one waiting longer than unpack_wait_s for room is "
                    "answered 503 with Retry-After (a job is retried later)")
    unpack_wait_s: float = Field(
        30.0, ge=0.0, le=600.0,
        description="how long a DICOM zip read waits for room in the unpack pool")

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: str) -> str:
        parse_api_keys(value)  # ValueError names the problem
        return value

    @field_validator("hard_time_limit_s")
    @classmethod
    def _hard_after_soft(cls, value: int, info) -> int:
        soft = info.data.get("soft_time_limit_s")
        if soft is not None and value <= soft:
            raise ValueError("DISA_HARD_TIME_LIMIT_S must exceed DISA_SOFT_TIME_LIMIT_S")
        return value

    @cached_property
    def api_key_entries(self) -> tuple[ApiKey, ...]:
        """Accepted keys with their owner names and roles; empty when authentication is off."""
        return parse_api_keys(self.api_keys)

    @property
    def api_key_digests(self) -> tuple[str, ...]:
        """Accepted key digests; empty when authentication is off."""
        return tuple(key.digest for key in self.api_key_entries)

    def apply_unpack_pool(self) -> None:
        """Size this process's DICOM unpack pool (at the start of the API or a worker); a
        zip is unpacked in its job's folder only, never in the system's temporary folder."""
        from disa.core.io.dicom_zip import configure_unpack_pool

        configure_unpack_pool(self.unpack_pool_bytes, self.unpack_wait_s, temp_fallback=False)

    @property
    def embedded(self) -> bool:
        """True when no broker is configured: the API runs jobs in its own worker thread."""
        return not self.broker_url

    @property
    def visibility_timeout_s(self) -> int:
        """Redis visibility timeout: above the hard time limit (see VISIBILITY_MARGIN_S)."""
        return self.hard_time_limit_s + VISIBILITY_MARGIN_S


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings()
