"""Settings of the serving <-> sidecar transport: endpoints, CURVE keys, queue depths, timeouts, wire limits.

Env prefix `ADASPEC_TRANSPORT_`. Endpoints default to IPC sockets in a private run dir (created 0700, each
socket chmod-ed 0600 after bind). A `tcp://` endpoint is refused unless CURVE keys are configured: weights
and training logs never cross a network in the clear or unauthenticated.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import zmq
import zmq.auth
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adaspec.core.online.wire import WireLimits

#: The four channels; each has an endpoint field `<name>_endpoint`.
CHANNELS = ("logs", "weights", "sync", "admin")


def default_run_dir() -> Path:
    """$XDG_RUNTIME_DIR/adaspec (per-user, tmpfs) or <tmp>/adaspec-<uid>."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return Path(base) / "adaspec"
    return Path(tempfile.gettempdir()) / f"adaspec-{os.getuid()}"


@dataclass(frozen=True)
class CurveKeys:
    """This process's CURVE key pair (Z85 bytes), the server's public key when connecting, and optionally a
    directory of authorised client public certificates when binding (ZAP allow-list)."""

    public: bytes
    secret: bytes
    server_public: bytes | None = None
    authorized_dir: Path | None = None
    #: Binding side, explicitly insecure: any client that knows the server's public key is admitted (traffic
    #: is still encrypted). Only with `curve_allow_any_client`; without it and without an allow-list, tcp
    #: binds are refused.
    allow_any_client: bool = False


def _z85_key(value: str, field: str) -> str:
    if len(value) != 40:
        raise ValueError(f"{field} must be a 40-character Z85 CURVE key")
    try:
        zmq.utils.z85.decode(value.encode("ascii"))
    except Exception:
        raise ValueError(f"{field} is not valid Z85") from None
    return value


class TransportSettings(BaseSettings):
    """Every transport knob, validated once; a TCP endpoint without CURVE keys is a configuration error."""

    model_config = SettingsConfigDict(
        env_prefix="ADASPEC_TRANSPORT_", extra="forbid", validate_default=True, validate_assignment=True
    )

    run_dir: Path = Field(
        default_factory=default_run_dir,
        description="Directory for the default IPC sockets (created 0700; sockets are 0600).",
    )
    logs_endpoint: str = Field(default="", description="Servers PUSH step logs, the sidecar PULLs ('' = IPC default).")
    weights_endpoint: str = Field(default="", description="Sidecar PUBlishes weight updates ('' = IPC default).")
    sync_endpoint: str = Field(
        default="", description="REQ/REP path a (re)starting server asks for current weights on ('' = IPC default)."
    )
    admin_endpoint: str = Field(default="", description="Admin REQ/REP commands to the sidecar ('' = IPC default).")

    curve_public_key: str | None = Field(default=None, description="This process's CURVE public key (Z85).")
    curve_secret_key: SecretStr | None = Field(default=None, description="This process's CURVE secret key (Z85).")
    curve_key_file: Path | None = Field(
        default=None, description="zmq.auth secret certificate file (alternative to the two keys above)."
    )
    curve_server_key: str | None = Field(
        default=None, description="The sidecar's CURVE public key (Z85), needed by connecting peers."
    )
    curve_server_key_file: Path | None = Field(
        default=None, description="zmq.auth certificate file holding the sidecar's public key."
    )
    curve_authorized_keys_dir: Path | None = Field(
        default=None,
        description="Binding side: only clients whose public certificate is in this dir may connect (ZAP).",
    )

    curve_allow_any_client: bool = Field(
        default=False,
        description="INSECURE: bind tcp:// with CURVE but no allow-list, admitting any client that knows the "
        "server's public key (it could pause, reset or export). For a trusted network only; say so explicitly.",
    )

    logs_sndhwm: int = Field(default=256, ge=1, le=1_000_000, description="Log batches queued per server before dropping.")
    logs_rcvhwm: int = Field(default=4096, ge=1, le=1_000_000, description="Log batches queued in the sidecar.")
    weights_hwm: int = Field(default=4, ge=1, le=1024, description="Weight updates queued per subscriber (PUB drops beyond).")
    request_timeout_ms: int = Field(
        default=2000, ge=1, le=600_000, description="Sync and admin requests give up after this long."
    )
    resync_s: float = Field(
        default=2.0, gt=0.0, le=86_400.0,
        description="Servers re-ask for current weights this often (covers PUB drops; doubles as the heartbeat).",
    )
    link_timeout_s: float = Field(
        default=10.0, gt=0.0, le=86_400.0,
        description="A server stops using the online-learned drafter when the sidecar has not answered for this "
        "long (the controller falls back to the static head until it answers again).",
    )

    log_batch_entries: int = Field(default=64, ge=1, le=1_000_000, description="Step entries per LogBatch.")
    log_flush_s: float = Field(default=0.25, ge=0.0, le=3600.0, description="Flush a partial LogBatch after this long.")
    feature_sample_rate: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Fraction of step entries that carry target hidden-state features."
    )

    max_message_bytes: int = Field(default=512 * 2**20, ge=1024, le=2**40, description="Largest message decoded.")
    max_entries: int = Field(default=4096, ge=1, le=10_000_000, description="Most entries in one LogBatch.")
    max_tokens_per_entry: int = Field(default=4096, ge=1, le=10_000_000, description="Most tokens in one entry.")
    max_tensor_bytes: int = Field(default=256 * 2**20, ge=1, le=2**40, description="Largest tensor decoded.")
    max_tensors: int = Field(default=1024, ge=1, le=1_000_000, description="Most tensors in one weight update.")

    @field_validator("logs_endpoint", "weights_endpoint", "sync_endpoint", "admin_endpoint")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if v and not (v.startswith("ipc://") or v.startswith("tcp://")):
            raise ValueError("endpoint must be ipc://PATH or tcp://HOST:PORT")
        return v

    @field_validator("curve_public_key", "curve_server_key")
    @classmethod
    def _key(cls, v: str | None, info) -> str | None:
        return None if v is None else _z85_key(v, info.field_name)

    @field_validator("curve_secret_key")
    @classmethod
    def _secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            _z85_key(v.get_secret_value(), "curve_secret_key")
        return v

    @model_validator(mode="after")
    def _tcp_needs_curve(self) -> "TransportSettings":
        if (self.curve_public_key is None) != (self.curve_secret_key is None):
            raise ValueError("curve_public_key and curve_secret_key must be set together")
        tcp = [c for c in CHANNELS if self.endpoint(c).startswith("tcp://")]
        if tcp and not self.has_curve():
            raise ValueError(
                f"tcp endpoints ({', '.join(tcp)}) need CURVE keys: set curve_public_key/curve_secret_key "
                "or curve_key_file (make a pair with `python -c 'import zmq; print(zmq.curve_keypair())'`)"
            )
        return self

    @model_validator(mode="after")
    def _heartbeat_fits_timeout(self) -> "TransportSettings":
        if self.link_timeout_s <= self.resync_s:
            raise ValueError(
                f"link_timeout_s ({self.link_timeout_s}) must exceed resync_s ({self.resync_s}): the periodic "
                "sync is the heartbeat, a timeout shorter than its period would flap"
            )
        return self

    def has_curve(self) -> bool:
        return self.curve_key_file is not None or self.curve_public_key is not None

    def endpoint(self, channel: Literal["logs", "weights", "sync", "admin"]) -> str:
        """The configured endpoint, or the IPC default `ipc://<run_dir>/adaspec-<channel>.sock`."""
        v = getattr(self, f"{channel}_endpoint")
        return v or f"ipc://{self.run_dir}/adaspec-{channel}.sock"

    def curve_keys(self) -> CurveKeys | None:
        """Loaded CURVE keys, or None when none are configured (then only IPC endpoints work)."""
        if not self.has_curve():
            return None
        if self.curve_key_file is not None:
            public, secret = zmq.auth.load_certificate(self.curve_key_file)
            if secret is None:
                raise ValueError(f"{self.curve_key_file} holds no secret key")
        else:
            assert self.curve_public_key is not None and self.curve_secret_key is not None
            public = self.curve_public_key.encode()
            secret = self.curve_secret_key.get_secret_value().encode()
        try:
            derived = zmq.curve_public(secret)
        except (zmq.ZMQError, ValueError) as exc:
            raise ValueError(f"the CURVE secret key is not a valid Z85 key ({exc})") from None
        if derived != public:  # D21: a mismatched pair starts fine, but no client could ever connect
            raise ValueError("the CURVE public key does not belong to the secret key (the pair does not match)")
        server = self.curve_server_key.encode() if self.curve_server_key else None
        if server is None and self.curve_server_key_file is not None:
            server, _ = zmq.auth.load_certificate(self.curve_server_key_file)
        return CurveKeys(public, secret, server, self.curve_authorized_keys_dir, self.curve_allow_any_client)

    def wire_limits(self) -> WireLimits:
        return WireLimits(
            max_message_bytes=self.max_message_bytes,
            max_entries=self.max_entries,
            max_tokens_per_entry=self.max_tokens_per_entry,
            max_tensor_bytes=self.max_tensor_bytes,
            max_tensors=self.max_tensors,
        )
