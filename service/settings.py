"""Service settings: defaults < config file (YAML, TOML or JSON) < environment (``WBMRI_*``) < explicit arguments."""
from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.nifti import DEFAULT_MAX_VOXELS

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class ServiceConfigError(ValueError):
    """Settings that cannot be served safely or at all; the message says what to change."""


class Settings(BaseSettings):
    """Everything the service reads; each field is also ``WBMRI_<NAME>`` in the environment."""

    model_config = SettingsConfigDict(env_prefix="WBMRI_", extra="ignore", validate_default=True)

    host: str = Field("127.0.0.1", description="interface to listen on; not loopback requires API keys")
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path = Field(Path("var"), description="SQLite job store, uploads and results")
    model: Path | None = Field(None, description="model bundle folder (default: the shipped models/default)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    tta: str | None = Field(None, description="test-time augmentation: none | flip_lr | flip_lr_anatomy | "
                            "flip_lr_anatomy_filled | flip_lr_anatomy_shift4 | flip_lr_anatomy_shift8 (default: the model "
                            "card's; a CPU without bf16 may want none, "
                            "the mirror pass doubles the network time)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads per inference worker")
    workers: int = Field(1, ge=1, le=16, description="inference worker processes (jobs analysed at once)")
    max_upload_mb: float = Field(1024.0, gt=0, description="upload size limit, enforced while streaming")
    max_voxels: int = Field(DEFAULT_MAX_VOXELS, ge=1, description="voxel budget checked from the header")
    max_queue: int = Field(32, ge=1, description="queued + running jobs accepted at once; more get 429")
    job_timeout_s: float = Field(1800.0, gt=0, description="per-job time limit; the worker is restarted past it")
    max_attempts: int = Field(3, ge=1, description="starts of one job (crash recovery) before it is failed")
    max_wait_s: float = Field(300.0, ge=0, description="upper bound of POST /v1/studies?wait=")
    retention_days: float = Field(7.0, ge=0, description="finished studies older than this are deleted; 0 keeps all")
    maintenance_interval_s: float = Field(300.0, gt=0, description="how often retention and clean-up run")
    heartbeat_s: float = Field(2.0, gt=0, description="running jobs refresh their heartbeat this often")
    stale_after_s: float = Field(120.0, gt=0, description="a running job without heartbeat this long is re-queued")
    db_busy_timeout_s: float = Field(30.0, gt=0, description="a job-store write waits this long for another "
                                                              "process's lock before it fails (and is retried)")
    api_keys: SecretStr = Field(SecretStr(""), description="comma-separated bearer tokens")
    api_key_file: Path | None = Field(None, description="file with one bearer token per line (# comments)")
    cors_origins: str = Field("", description="comma-separated origins allowed by CORS; empty = CORS off")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    job_delay_s: float = Field(0.0, ge=0, description="TESTS ONLY: sleep this long inside every job")
    config_file: Path | None = Field(None, description="the config file these settings were read from")

    @field_validator("tta")
    @classmethod
    def _tta(cls, v: str | None) -> str | None:
        if v is not None:
            from models.networks import TTA_MODES
            if v not in TTA_MODES:
                raise ValueError(f"must be one of {', '.join(TTA_MODES)}")
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("host must not be empty")
        return v

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def cors_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def keys(self) -> list[str]:
        """The accepted bearer tokens from ``api_keys`` and ``api_key_file``."""
        keys = [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]
        if self.api_key_file is not None:
            try:
                lines = Path(self.api_key_file).read_text().splitlines()
            except OSError as exc:
                raise ServiceConfigError(f"cannot read the API key file {self.api_key_file}: {exc.strerror}") from None
            keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        return keys

    def check_safe(self) -> None:
        """Refuse to serve without API keys on anything but a loopback interface."""
        keys = self.keys()
        if any(len(k) < 16 for k in keys):
            raise ServiceConfigError("API keys must be at least 16 characters long")
        if not is_loopback(self.host) and not keys:
            raise ServiceConfigError(
                f"refusing to listen on {self.host} without an API key: anyone on the network could upload and "
                "read studies. Set WBMRI_API_KEYS (comma-separated) or WBMRI_API_KEY_FILE, or listen on 127.0.0.1.")


def is_loopback(host: str) -> bool:
    """True for localhost names and 127.0.0.0/8 or ::1 addresses."""
    h = host.strip().strip("[]").lower()
    if h in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _read_config_file(path: Path) -> dict[str, Any]:
    """A flat mapping of setting names to values from a .yaml/.yml, .toml or .json file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ServiceConfigError(f"cannot read the config file {path}: {exc.strerror}") from None
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as exc:  # each parser has its own error types
        raise ServiceConfigError(f"config file {path} is not valid {suffix.lstrip('.') or 'YAML'}: {exc}") from None
    data = data or {}
    if isinstance(data, dict) and isinstance(data.get("service"), dict):
        data = data["service"]
    if not isinstance(data, dict):
        raise ServiceConfigError(f"config file {path} must hold a mapping of setting names to values")
    unknown = sorted(set(data) - set(Settings.model_fields))
    if unknown:
        raise ServiceConfigError(f"config file {path}: unknown settings {unknown}; "
                                 f"known: {sorted(Settings.model_fields)}")
    return data


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Settings from defaults, then the config file (or ``WBMRI_CONFIG_FILE``), then the environment, then the
    non-None ``overrides``. Raises :class:`ServiceConfigError` with a readable message."""
    from pydantic import ValidationError
    path = config_file or os.environ.get("WBMRI_CONFIG_FILE") or None
    merged: dict[str, Any] = _read_config_file(Path(path)) if path else {}
    try:
        from_env = Settings()
        merged.update({k: getattr(from_env, k) for k in from_env.model_fields_set})
        merged.update({k: v for k, v in overrides.items() if v is not None})
        if path:
            merged["config_file"] = Path(path)
        return Settings(**merged)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise ServiceConfigError(f"invalid settings: {problems}") from None
