"""Settings: DISA_ prefix, lazy and resettable, key digests, limits."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from disa.jobs.keys import key_digest
from disa.jobs.settings import Settings, get_settings
from disa.service.security import key_accepted


def test_read_from_disa_environment_lazily(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setenv("DISA_JOBS_DIR", str(tmp_path))
    monkeypatch.setenv("DISA_BROKER_URL", "redis://h:6379/0")
    monkeypatch.setenv("DISA_MAX_UPLOAD_BYTES", "1234")
    get_settings.cache_clear()
    try:
        s = get_settings()
        assert s.jobs_dir == tmp_path and s.max_upload_bytes == 1234 and not s.embedded
        assert get_settings() is s  # cached until reset
        assert s.visibility_timeout_s > s.hard_time_limit_s > s.soft_time_limit_s
    finally:
        get_settings.cache_clear()


def test_embedded_without_broker():
    assert Settings(broker_url=None).embedded and Settings(broker_url="").embedded


def test_api_keys_are_digests_not_keys():
    digest = key_digest("secret")
    s = Settings(api_keys=f" {digest.upper()} , {key_digest('other')}")
    assert s.api_key_digests == (digest, key_digest("other"))
    assert key_accepted("secret", s.api_key_digests)
    assert not key_accepted("Secret", s.api_key_digests)
    assert not key_accepted("", s.api_key_digests)
    with pytest.raises(ValidationError, match="SHA-256"):
        Settings(api_keys="secret")
    assert Settings(api_keys="").api_key_digests == ()


def test_hard_limit_must_exceed_soft_limit():
    with pytest.raises(ValidationError, match="HARD"):
        Settings(soft_time_limit_s=100, hard_time_limit_s=100)


def test_the_unpack_pool_is_a_setting_applied_per_process(monkeypatch: pytest.MonkeyPatch):
    from disa.core.io import dicom_zip

    pool = dicom_zip.UnpackPool(dicom_zip.DEFAULT_POOL_BYTES)
    monkeypatch.setattr(dicom_zip, "_POOL", pool)
    monkeypatch.setenv("DISA_UNPACK_POOL_BYTES", str(64 * 1024**2))
    monkeypatch.setenv("DISA_UNPACK_WAIT_S", "2.5")
    s = Settings()
    assert (s.unpack_pool_bytes, s.unpack_wait_s) == (64 * 1024**2, 2.5)
    assert (pool.capacity, pool.wait_s) == (dicom_zip.DEFAULT_POOL_BYTES, 30.0)  # not yet
    s.apply_unpack_pool()
    assert (pool.capacity, pool.wait_s) == (64 * 1024**2, 2.5)
    assert not pool.temp_fallback  # the job's folder only, never /tmp
    with pytest.raises(ValidationError, match="unpack_pool_bytes"):
        Settings(unpack_pool_bytes=1000)  # below 1 MiB: no DICOM slice would fit
    with pytest.raises(ValidationError, match="unpack_wait_s"):
        Settings(unpack_wait_s=-1)
