"""Server settings: one pydantic-settings class.

Every field can be set on the command line (``inpaint-server serve --help``), as an ``INPAINT_*``
environment variable, as a file in ``INPAINT_SECRETS_DIR`` named after the variable (Docker and
Kubernetes secrets), or in a TOML config file (``--config FILE`` or ``INPAINT_CONFIG``); that is
also the order of precedence. A bad value fails at start with a message that names the setting.
"""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from .inputs.url_guard import parse_allow_entry

ENV_PREFIX = "INPAINT_"
# A folder of files named after the variables (inpaint_api_keys, ...), each holding one setting's value: how
# Docker and Kubernetes secrets arrive (/run/secrets in the image). Read after the environment, before the file.
SECRETS_DIR_ENV = "INPAINT_SECRETS_DIR"
_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("config_file", default=None)


def device_name(text: str) -> str:
    """A --devices entry as a torch device name: 2 -> cuda:2; cuda, cuda:1, cpu, all as they are."""
    text = text.strip().lower()
    if text.isdigit():
        return f"cuda:{int(text)}"
    if text in ("all", "cpu", "cuda") or (text.startswith(("cuda:", "cpu:")) and text.split(":")[1].isdigit()):
        return text
    raise ValueError(f"{text!r} is not a device: use all, an index (0), cuda:N or cpu")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "inpaint-server"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 for every interface).")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    data_dir: Path = Field(
        default_factory=default_data_dir, description="Job store, generated files, uploads and keys live here."
    )
    store: str | None = Field(
        None,
        description="The job store: sqlite:///PATH (default: DATA_DIR/jobs.sqlite3) or "
        "postgresql://USER:PASSWORD@HOST/DB (shared by many hosts; pip install 'inpaint-server[postgres]').",
    )
    files: str | None = Field(
        None,
        description="Where result files and uploads live: a directory (shared by every node, e.g. NFS, when there "
        "are several) or an S3-compatible bucket, s3://BUCKET/PREFIX (endpoint and credentials from the usual AWS "
        "variables: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION; pip install "
        "'inpaint-server[s3]'). Default: under DATA_DIR.",
    )
    devices: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="GPUs to serve, one worker process each: 'all' (every CUDA device), or indexes and device names "
        "such as 0,2 or cuda:1 (cpu entries stand in for GPUs in tests). Default: one worker inside the server "
        "process, on device.",
    )
    workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="GPU worker processes this server starts: 0 makes it an API node only (workers run elsewhere: "
        "inpaint-server worker). Default: one per entry of devices, or one worker inside the server process.",
    )
    node_name: str | None = Field(
        None,
        description="This process's name in the job store's node list and metrics (default: the host name, and "
        "HOST/DEVICE for a worker).",
    )
    lease_s: float = Field(
        30.0,
        ge=1.0,
        le=3600.0,
        description="How long a worker's claim on a running batch lasts unless renewed (every lease_s/3 while it "
        "runs). A worker gone for longer (killed, cut off) loses its batch to another worker, which runs it again "
        "with the same seeds; on one host a dead worker's batch is taken back at once.",
    )
    worker_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="inpaint-server worker: port of its /health/live, /health/ready and /metrics (0: none).",
    )
    public_url: str | None = Field(
        None,
        description="Base URL clients reach this server at (used in *_url fields and file URLs). "
        "Default: the scheme and Host of each request.",
    )
    models: Literal["hub", "tiny"] = Field(
        "hub", description="hub: real weights from the Hugging Face cache; tiny: tiny random-weight stand-ins."
    )
    device: str | None = Field(None, description="cpu or cuda[:N] (default: cuda when available).")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys (clients send 'Authorization: Key <key>'); comma-separated in the "
        "environment. Empty: no authentication.",
    )
    token_max_lifetime_s: int = Field(
        3600,
        ge=1,
        description="Longest lifetime of a temporary token (POST /tokens/ with token_expiration in seconds); "
        "a longer one is refused with 422.",
    )
    tls_cert: Path | None = Field(None, description="PEM certificate chain; serves HTTPS together with tls_key.")
    tls_key: Path | None = Field(None, description="PEM private key for tls_cert.")
    config_dir: Path | None = Field(None, description="App configs (default: the bundled configs/).")
    model_paths: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="Local files instead of the Hub, KEY=PATH (see inpaint-server generate --help).",
    )
    apps: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Load only these variants, as APP or APP:STEPS (e.g. fast-lightning-sdxl:4). Default: all.",
    )
    warmup: bool = Field(
        True, description="Warm every variant up (at warmup_sizes) before reporting ready; false: ready at once."
    )
    max_batch_size: int = Field(
        4, ge=1, le=64, description="Most requests run together in one GPU batch (and at most 8 image rows in all)."
    )
    compile: bool | None = Field(
        None,
        description="torch.compile the UNet's transformer blocks and the VAE (dynamic shapes: a few graphs shared by "
        "every variant and size) and record whole-UNet CUDA graphs per variant, batch bucket (1/2/4/8) and size "
        "during the warm-up. Default: on with CUDA, off on CPU. A cold first start compiles for a few minutes; "
        "later ones read compile_cache_dir.",
    )
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="Inductor's mode. max-autotune-no-cudagraphs benchmarks kernel choices at compile time (minutes "
        "more on a cold cache); use it only where the benchmark shows it pays (docs/performance.md).",
    )
    cuda_graphs: bool | None = Field(
        None, description="Record whole-UNet CUDA graphs in the warm-up (needs compile). Default: on with compile."
    )
    attention: Literal["auto", "cudnn", "flash", "efficient"] = Field(
        "auto",
        description="Which scaled-dot-product attention backend torch tries first on CUDA (auto: torch's order, "
        "flash first). cudnn may be faster on Hopper; measure with scripts/bench.py --sections levers.",
    )
    fp8: bool = Field(
        False,
        description="Run the UNet's linear layers in FP8 (torchao, per-row scales; GPUs of compute 8.9+, pip install "
        "'inpaint-server[fp8]'). Each UNet is checked against bf16 on the same weights at start; past fp8_max_error "
        "the server refuses to start.",
    )
    fp8_max_error: float = Field(
        0.05, gt=0, le=1, description="fp8's gate: largest relative L2 error of the UNet's output against bf16."
    )
    warmup_sizes: Annotated[list[tuple[int, int]] | None, NoDecode] = Field(
        None,
        description="Image sizes to warm (presets or WxH, comma-separated), so the first request at each pays no "
        "first-call or compile cost. The default size (square_hd) is warmed before the server is ready; with compile "
        "on, the others are warmed after, in the background, and run without CUDA graphs until then. Default: every "
        "image_size preset on CUDA, none on CPU.",
    )
    compile_cache_dir: Path | None = Field(
        None, description="Where compiled kernels are kept between starts. Default: DATA_DIR/compile-cache."
    )
    prompt_cache_size: int = Field(
        512, ge=0, description="Prompts whose text embeddings are kept on the GPU for reuse (~0.3 MB each); 0: off."
    )
    batch_window_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="How long a request ready to run waits for batch-mates (same app, steps and size) when its "
        "batch is not full and another queued request's inputs are still being fetched or decoded; 0: never wait.",
    )
    result_retention_s: float = Field(
        7 * 24 * 3600,
        gt=0,
        description="Completed requests and their files are deleted this long after completion. An object lifecycle "
        "a client asks for (uploads, a request's files) may only shorten it.",
    )
    gc_interval_s: float = Field(
        5,
        gt=0,
        description="How often expired requests, files and uploads are deleted. They answer 404 from the moment they "
        "expire; this bounds how long their bytes stay on disk after that.",
    )
    disk_reserve_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="While less than this is free on the disk of the job store (SQLite) or of the files, submits and "
        "uploads get 507 insufficient_storage, /health/ready is 503 and no new batch starts, so the requests already "
        "running can still save their results; it all resumes by itself once space is freed. 0: only writes that "
        "fail for lack of space count.",
    )
    max_attempts: int = Field(
        2, ge=1, le=10, description="Runs a job gets when restarts interrupt it; then it fails with 'interrupted'."
    )
    # GPU faults
    step_timeout_s: float = Field(
        300.0,
        ge=0,
        description="Watchdog: a running batch that shows no progress (a denoising step) for this long is taken for a "
        "hung GPU: readiness turns 503 and the process exits with status 75 for a restart. It must cover text "
        "encoding before the first step and VAE decode and safety checker after the last. 0: off.",
    )
    gpu_fault_exit_delay_s: float = Field(
        2.0,
        ge=0,
        le=60,
        description="After a fatal GPU error or a watchdog timeout: how long /health/ready answers 503 with the "
        "reason before the process exits with status 75.",
    )
    input_max_bytes: int = Field(50 * 1024 * 1024, gt=0, description="Largest image, mask or embedding fetched.")
    input_timeout_s: float = Field(20.0, gt=0, description="Deadline for fetching one input URL.")
    upload_max_bytes: int = Field(100 * 1024 * 1024, gt=0, description="Largest file accepted by the upload routes.")
    # Limits
    max_body_bytes: int = Field(
        64 * 1024 * 1024,
        gt=0,
        description="Largest request body (JSON with data URIs included), refused with 413 while it streams in. "
        "The upload routes have upload_max_bytes instead.",
    )
    max_image_pixels: int = Field(
        50_000_000,
        gt=0,
        le=89_478_485,
        description="Most pixels (width x height, read from the header before decoding) of an input image or mask; "
        "at most Pillow's own decompression-bomb limit, 89478485.",
    )
    max_output_pixels: int = Field(
        2048 * 2048, ge=64 * 64, description="Most pixels (width x height) of image_size; more is refused with 422."
    )
    max_num_images: int = Field(8, ge=1, le=8, description="Most images one request may ask for (num_images).")
    queue_max_wait_s: float = Field(
        300.0,
        gt=0,
        description="The queue takes a request while the image rows already waiting would take the live GPU workers "
        "at most this long, at their measured throughput; past it a submit (queue or sync run) gets 429 queue_full "
        "with Retry-After.",
    )
    queue_assumed_rows_per_s: float = Field(
        1.0,
        gt=0,
        description="Throughput (image rows per second) assumed for a GPU worker before any worker has been "
        "measured (after that, an unmeasured worker counts as one worker was last measured); low on purpose.",
    )
    max_prompt_chars: int = Field(
        10_000,
        ge=100,
        le=1_000_000,
        description="Longest prompt, in characters; longer is refused with 422. The model reads only its first 75 "
        "tokens (a few hundred characters) and says in the request's logs what it ignored.",
    )
    max_queue_size: int = Field(
        100_000,
        ge=1,
        description="Hard cap on requests waiting in the queue, whatever the throughput; a submit beyond it gets 429 "
        "queue_full with Retry-After.",
    )
    rate_limit_per_minute: int = Field(
        0, ge=0, description="Submits (queue and sync runs) per minute per API key; 429 with Retry-After. 0: off."
    )
    rate_limit_burst: int = Field(
        0, ge=0, description="Submits one API key may send at once before the rate applies (0: rate_limit_per_minute)."
    )
    webhook_max_attempts: int = Field(10, ge=1, le=100, description="Delivery attempts per webhook.")
    webhook_retry_base_s: float = Field(15.0, gt=0, description="Delay before the first retry; doubles each time.")
    webhook_retry_max_s: float = Field(2700.0, gt=0, description="Longest delay between two webhook attempts.")
    webhook_timeout_s: float = Field(15.0, gt=0, description="Per-attempt timeout of a webhook delivery.")
    webhook_signing: bool = Field(
        True, description="Sign webhooks with Ed25519 (X-Fal-Webhook-* headers; keys at /.well-known/jwks.json)."
    )
    webhook_key_file: Path | None = Field(
        None,
        description="Ed25519 private key (PEM) for webhook signatures; default: one key kept in the job store, "
        "shared by every API node.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"], description="Origins allowed to call the API from a browser."
    )
    playground: bool = Field(
        True,
        description="Serve the browser playground at / and the operations page at /ui/status (they call the "
        "public API with the key typed into them).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    # Slow clients
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A connection that has not sent a request's complete headers this long after it opened (or "
        "after the request's first byte, when kept alive) is closed (slowloris).",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A request body may pause this long at most, and after this long it must have come in at "
        "min_body_rate on average; otherwise 408 and the connection is closed.",
    )
    min_body_rate: float = Field(
        1024.0, ge=0, description="Bytes per second a request body must average once body_timeout_s has passed."
    )
    # Draining and idempotency
    drain_grace_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM, how long the running batch gets to finish; queued requests stay queued for the "
        "next start, and a batch still running after this runs again after a restart.",
    )

    stream_keepalive_s: float = Field(
        15.0,
        gt=0,
        le=3600,
        description="A status stream with nothing new to say sends an SSE comment this often, so proxies with an "
        "idle timeout keep it open while the request waits (fal documents 15 s).",
    )

    # Fetching
    fetch_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Non-public hosts that image_url, mask_url, embedding paths and fal_webhook may reach (e.g. an "
        "internal object store): networks (10.0.0.0/8, 10.1.2.3, fd00::/8) or host names (minio.internal, "
        "*.corp.example); comma-separated in the environment. Default: public addresses only.",
    )
    fetch_connect_timeout_s: float = Field(
        5.0, gt=0, description="Deadline for resolving a user URL's host and connecting to it (each attempt)."
    )
    fetch_retry_base_s: float = Field(
        0.5, ge=0, description="Delay before retrying a fetch after a connection reset (2 retries, doubling)."
    )

    @field_validator("fetch_allow", mode="before")
    @classmethod
    def _fetch_allow(cls, value: Any) -> Any:
        entries = [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value
        if isinstance(entries, list):
            for entry in entries:
                parse_allow_entry(str(entry))  # a ValueError names the bad entry
        return entries

    @field_validator("api_keys", "apps", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("warmup_sizes", mode="before")
    @classmethod
    def _parse_sizes(cls, value: Any) -> Any:
        from .inputs.image_sizes import parse_image_size

        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            return [parse_image_size(item) if isinstance(item, str) else item for item in value]
        return value

    @field_validator("model_paths", mode="before")
    @classmethod
    def _parse_pairs(cls, value: Any) -> Any:
        if isinstance(value, str):
            pairs = {}
            for item in filter(None, (p.strip() for p in value.split(","))):
                key, sep, path = item.partition("=")
                if not sep or not key or not path:
                    raise ValueError(f"expected KEY=PATH pairs separated by commas, got {item!r}")
                pairs[key] = path
            return pairs
        return value

    @field_validator("api_keys")
    @classmethod
    def _keys_ascii(cls, value: list[str]) -> list[str]:
        for key in value:
            if not key.isascii() or not key.isprintable() or " " in key:
                raise ValueError("API keys must be printable ASCII without spaces")
        return value

    @field_validator("devices", mode="before")
    @classmethod
    def _parse_devices(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            if not value:
                return None
            if value != ["all"] and "all" in value:
                raise ValueError("'all' stands alone, e.g. --devices all or --devices 0,2")
            return [device_name(str(v)) for v in value]
        return value

    @field_validator("files")
    @classmethod
    def _files_url(cls, value: str | None) -> str | None:
        if value and value.startswith("s3:") and not value.startswith("s3://"):
            raise ValueError("expected s3://BUCKET/PREFIX or a directory")
        if value and value.startswith("s3://") and not value.removeprefix("s3://").split("/")[0]:
            raise ValueError("s3:// needs a bucket: s3://BUCKET/PREFIX")
        return value or None

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str | None) -> str | None:
        if value and not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("expected sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB")
        return value or None

    @field_validator("public_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://, e.g. https://gpu-box.example.com")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        for path in (self.tls_cert, self.tls_key):
            if path is not None and not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        return self

    @model_validator(mode="after")
    def _workers_and_devices(self) -> Settings:
        if self.devices and self.devices != ["all"] and self.workers not in (None, len(self.devices)):
            raise ValueError(
                f"workers={self.workers} but devices names {len(self.devices)}: give one of them "
                "(workers 0 with devices makes no sense either)"
            )
        return self

    @property
    def embedded_worker(self) -> bool:
        """Whether the GPU worker runs inside the server process (the default) rather than as processes of its own."""
        return self.devices is None and self.workers is None

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        secrets_dir = os.environ.get(SECRETS_DIR_ENV)
        if secrets_dir and Path(secrets_dir).is_dir():
            sources.append(SecretsSettingsSource(settings_cls, secrets_dir=secrets_dir))
        config = _config_file.get()
        if config is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config))
        return tuple(sources)


def cli_flag(name: str) -> str:
    """The ``serve`` option of a setting (server.cli_flags makes one per field): ``lease_s`` -> ``--lease-s``."""
    return "--" + name.replace("_", "-")


class SettingsError(ValueError):
    """Settings could not be built; the message lists each bad setting and where to fix it."""


def load_settings(overrides: dict[str, Any] | None = None, config_file: Path | None = None) -> Settings:
    """Settings from ``overrides`` (command line), ``INPAINT_*`` variables and the config file."""
    config_file = config_file or (Path(os.environ["INPAINT_CONFIG"]) if os.environ.get("INPAINT_CONFIG") else None)
    if config_file is not None and not config_file.is_file():
        raise SettingsError(f"config file {config_file} does not exist")
    token = _config_file.set(config_file)
    try:
        return Settings(**(overrides or {}))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            flag = f"{cli_flag(name)}, " if name in Settings.model_fields else ""
            hint = f" ({flag}{ENV_PREFIX}{name.upper()} or '{name}' in the config file)"
            if not err["loc"]:
                hint = ""
            lines.append(f"{name}: {err['msg']}{hint}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
    finally:
        _config_file.reset(token)
