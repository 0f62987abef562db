"""Every setting of kolm pipeline, read from `KOLM_*` environment variables with embedded defaults.

One place for configuration: the CLI, the Dagster resources and the servers all call `load_settings()` (and the
proxy `load_capture_config()`); each setting and its default is declared once, in the models below.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kolm_pipeline.provenance.atomic import private_dir
from kolm_pipeline.provenance.errors import InvalidInput

EMBEDDED_BASE_MODEL = "embedded:smollm2-135m-instruct"
# Where `make mlflow` serves the MLflow UI (and so where Dagster's MLflow links point by default).
DEFAULT_MLFLOW_UI_URL = "http://127.0.0.1:5000"

# Dollars per million tokens (input, output) used to price the teacher's captured usage.
DEFAULT_PRICE_TABLE: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "claude-sonnet-4": (3.00, 15.00),
    "claude-haiku-4": (0.80, 4.00),
    "default": (2.50, 10.00),
}


def price_of_call(model: str, prompt_tokens: float, completion_tokens: float,
                  price_table: dict[str, tuple[float, float]]) -> float:
    """Dollars of one call of `model` (the longest price-table name it starts with, else `default`)."""
    names = sorted((name for name in price_table if name != "default" and model.startswith(name)), key=len)
    price_in, price_out = price_table[names[-1]] if names else price_table["default"]
    return (prompt_tokens * price_in + completion_tokens * price_out) / 1_000_000


# Training weight of a pair by where its answer came from. A person's correction weighs more than an AI
# peer's answer; proxy traffic and plain imports count as usual. Keys are the capture sources of the store.
DEFAULT_SOURCE_WEIGHTS: dict[str, float] = {"capture": 1.0, "human": 1.0, "ai": 0.5, "import": 1.0}


def parse_source_weights(raw: str | None, name: str = "KOLM_SOURCE_WEIGHTS") -> dict[str, float]:
    """`source=weight` pairs separated by commas (`human=1.0,ai=0.5`), merged over the defaults; a
    weight is a finite number >= 0 (0: never learn from that source)."""
    weights = dict(DEFAULT_SOURCE_WEIGHTS)
    if not raw or not raw.strip():
        return weights
    seen: set[str] = set()
    for item in raw.split(","):
        if not item.strip():
            continue
        source, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not source:
            raise InvalidInput(f"{name}: expected source=weight pairs such as human=1.0,ai=0.5, got {item.strip()!r}")
        if source not in DEFAULT_SOURCE_WEIGHTS:
            raise InvalidInput(f"{name}: unknown source {source!r}: known are {', '.join(DEFAULT_SOURCE_WEIGHTS)}")
        if source in seen:
            raise InvalidInput(f"{name}: source {source!r} is given twice")
        seen.add(source)
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight < 0:
            raise InvalidInput(f"{name}: the weight of {source!r} must be a number >= 0, got {value!r}")
        weights[source] = weight
    return weights


def _price_table(raw: str | None) -> dict[str, tuple[float, float]]:
    """KOLM_PRICE_TABLE: JSON (inline or a file path) of {model prefix: [input $/Mtok, output $/Mtok]},
    merged over the defaults."""
    table = dict(DEFAULT_PRICE_TABLE)
    if not raw:
        return table
    text = raw
    if not raw.lstrip().startswith("{"):
        try:
            text = Path(raw).read_text()
        except OSError as exc:
            raise InvalidInput(f"KOLM_PRICE_TABLE: cannot read {raw}: {exc}") from exc
    try:
        loaded = json.loads(text)
        for model, (price_in, price_out) in loaded.items():
            table[model] = (float(price_in), float(price_out))
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidInput(f"KOLM_PRICE_TABLE must map model prefixes to [input, output] $/Mtok: {exc}") from exc
    return table


def _env_error(model: type[BaseSettings], exc: ValidationError) -> InvalidInput:
    """One line naming each bad variable: our own parsers' messages as they are, pydantic's after the name."""
    prefix = model.model_config.get("env_prefix", "")
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        field = model.model_fields.get(name)
        alias = field.validation_alias if field is not None and isinstance(field.validation_alias, str) else None
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidInput):
            problems.append(str(cause))
        else:
            variable = alias or (name if name.startswith(prefix.rstrip("_")) else prefix + name).upper()
            problems.append(f"{variable}: {error['msg']}, got {error.get('input')!r}")
    return InvalidInput("; ".join(problems))


class CaptureConfig(BaseSettings):
    """The proxy's tuning, from `KOLM_CAPTURE_*`. `record`: write captures at all (off only for benchmarks and
    dry runs); `max_body_bytes`: larger requests are refused with 413; `key_cache_ttl_s`: how long a kolm key
    lookup is reused (a revoked key stops working within it); `retention_sweep_s`: how often the server applies
    the retention windows (0: never, leave it to the `triaged_captures` asset); `batch_size`: captures per
    store transaction; `writer_poll_s`: how often the writer looks for newly journaled captures;
    `replay_interval_s`: how long it waits before trying a store that could not be reached again.

    Student routing (a namespace's `routing` switch): `serve_url` is where `kolm serve` answers for the deployed
    adapters (empty: no routing, every namespace is answered by the teacher); `student_timeout_s` is how long
    the proxy waits for a student answer before the teacher answers; `routing_refresh_s` how often a namespace's
    routing is read again (a switch change takes effect within it); `shadow_concurrency` how many comparisons
    run at once (more are skipped, and counted)."""

    model_config = SettingsConfigDict(env_prefix="KOLM_CAPTURE_", frozen=True, extra="ignore", env_ignore_empty=True)

    record: bool = True
    max_body_bytes: int = 8 * 1024 * 1024
    key_cache_ttl_s: float = 30.0
    batch_size: int = 200
    replay_interval_s: float = 1.0
    retention_sweep_s: float = 3600.0
    writer_poll_s: float = 0.05
    serve_url: str = ""
    student_timeout_s: float = Field(5.0, gt=0)
    routing_refresh_s: float = Field(2.0, gt=0)
    shadow_concurrency: int = Field(8, ge=1)


class TrainerConfig(BaseSettings):
    """Where the `adapter` asset trains, from `KOLM_TRAINER` and `KOLM_TRAINER_*`. `kind` (`KOLM_TRAINER`):
    `subprocess` (default: a Pipes subprocess where the run runs) or `k8s` (a Pipes pod per training, from
    `image`, requesting `gpus` GPUs, `cpu` and `memory`, on nodes matching `node_selector` (JSON), in `namespace`
    (default: the run pod's own). The pod shares no volume with the run: it fetches its train split by CID from
    the object store and publishes the adapter there, `scratch` being the size of its own KOLM_HOME (emptyDir)."""

    model_config = SettingsConfigDict(env_prefix="KOLM_TRAINER_", frozen=True, extra="ignore", env_ignore_empty=True)

    kind: Literal["subprocess", "k8s"] = Field("subprocess", validation_alias=AliasChoices("KOLM_TRAINER", "kind"))
    image: str = "registry.example.com/kolm/kolm-trainer:0.1.0"
    namespace: str | None = None
    gpus: int = Field(1, ge=0, le=16)
    cpu: str = "4"
    memory: str = "16Gi"
    node_selector: dict[str, str] = Field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    scratch: str = "50Gi"


def load_trainer_config() -> TrainerConfig:
    """The trainer's placement from `KOLM_TRAINER*`; a bad value is one `InvalidInput` naming the variable."""
    try:
        return TrainerConfig()
    except ValidationError as exc:
        raise _env_error(TrainerConfig, exc) from None


def load_capture_config() -> CaptureConfig:
    """The proxy's tuning from `KOLM_CAPTURE_*`; a bad value is one `InvalidInput` naming the variable."""
    try:
        return CaptureConfig()
    except ValidationError as exc:
        raise _env_error(CaptureConfig, exc) from None


class Settings(BaseSettings):
    """Resolved configuration, from `KOLM_<FIELD>` variables (`KOLM_MLFLOW_URI` for the tracking URI) over the
    embedded defaults. Paths are absolute so child processes see the same files."""

    model_config = SettingsConfigDict(env_prefix="KOLM_", frozen=True, extra="ignore", env_ignore_empty=True)

    home: Path = Path(".kolm")
    # Empty: derived from `home` (a SQLite file, a directory) when the settings are loaded.
    store_url: str = ""
    base_model: str = EMBEDDED_BASE_MODEL
    upstream_openai: str = "https://api.openai.com/v1"
    upstream_anthropic: str = "https://api.anthropic.com"
    distill_threshold: int = 1000
    mlflow_tracking_uri: str = Field("", validation_alias=AliasChoices("KOLM_MLFLOW_URI", "mlflow_tracking_uri"))
    # The MLflow UI that links in Dagster metadata open; empty: the tracking server when KOLM_MLFLOW_URI is one,
    # else what `make mlflow` serves.
    mlflow_ui_url: str = ""
    size_budget_bytes: int = 64 * 1024 * 1024
    student_dollars_per_hour: float = 0.10
    retention_days: int = 30
    # The weights' dtype where evaluation and `kolm serve` run the base (`train/base_model.py: inference_dtype`):
    # auto is bfloat16 on a GPU or a CPU with bfloat16 matmuls (AVX512-BF16, AMX), float32 elsewhere.
    inference_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    model_cache: Path | None = None
    alert_webhook: str | None = None
    # `s3://BUCKET[/PREFIX]`, `file:///DIR` or a path; None: the artifacts directory under `home`.
    artifacts_url: str | None = None
    # Tenants' signing keys (`<tenant>.key`, `<tenant>.pub`): a mounted Secret in production, so every run pod
    # signs with the same key; None: `home/keys`. Never the database.
    keys_path: Path | None = Field(None, validation_alias=AliasChoices("KOLM_KEYS_DIR", "keys_path"))
    price_table: Annotated[dict[str, tuple[float, float]], NoDecode] = Field(
        default_factory=lambda: dict(DEFAULT_PRICE_TABLE))
    # An optional judge of free-text answers (evaluate/judge.py): the model asked whether a student's answer says
    # what the teacher's does, over the OpenAI-compatible API at judge_url (None: upstream_openai). Unset: token F1.
    judge_model: str | None = None
    judge_url: str | None = None
    judge_api_key: SecretStr | None = None
    source_weights: Annotated[dict[str, float], NoDecode] = Field(default_factory=lambda: dict(DEFAULT_SOURCE_WEIGHTS))

    @field_validator("price_table", mode="before")
    @classmethod
    def _parse_price_table(cls, value: object) -> object:
        return _price_table(value) if isinstance(value, str) else value

    @field_validator("mlflow_ui_url")
    @classmethod
    def _check_mlflow_ui_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise InvalidInput(f"KOLM_MLFLOW_UI_URL: expected the http(s) address of the MLflow UI, got {value!r}")
        return value

    @field_validator("source_weights", mode="before")
    @classmethod
    def _parse_source_weights(cls, value: object) -> object:
        return parse_source_weights(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _resolve_paths(self) -> Settings:
        # Frozen model: the derived defaults are filled in once, here, before anyone reads them.
        home = self.home.expanduser().resolve()
        object.__setattr__(self, "home", home)
        object.__setattr__(self, "model_cache", (self.model_cache or home / "models").expanduser().resolve())
        object.__setattr__(self, "store_url", self.store_url or f"sqlite:///{home / 'captures.db'}")
        object.__setattr__(self, "mlflow_tracking_uri", self.mlflow_tracking_uri or f"sqlite:///{home / 'mlflow.db'}")
        if not self.mlflow_ui_url:
            server = self.mlflow_tracking_uri.startswith(("http://", "https://"))
            object.__setattr__(self, "mlflow_ui_url", self.mlflow_tracking_uri if server else DEFAULT_MLFLOW_UI_URL)
        object.__setattr__(self, "mlflow_ui_url", self.mlflow_ui_url.rstrip("/"))
        return self

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def artifacts_dir(self) -> Path:
        """Versioned `.kolm` artifacts, one directory per task."""
        return self.home / "artifacts"

    @property
    def adapters_dir(self) -> Path:
        """Pointers `adapters/<task>` naming the serving artifact of each task."""
        return self.home / "adapters"

    @property
    def keys_dir(self) -> Path:
        """KOLM_KEYS_DIR, else `home/keys`."""
        return self.keys_path.expanduser().resolve() if self.keys_path else self.home / "keys"

    @property
    def work_dir(self) -> Path:
        """Per-namespace stage outputs: corpus, recipe, adapter, evaluation, receipts."""
        return self.home / "work"

    @property
    def models_dir(self) -> Path:
        """Cache of resolved base models (the dequantized embedded base lives here)."""
        return self.model_cache

    @property
    def journal_dir(self) -> Path:
        """The capture proxies' journals: captures between the response and the store (see capture/journal.py)."""
        return self.home / "capture-log"

    @property
    def quarantine_dir(self) -> Path:
        """Captures the store refused, each with the reason."""
        return self.home / "quarantine"

    @property
    def spool_dir(self) -> Path:
        """Where versions before the journal spooled captures; stored once and emptied by the writer."""
        return self.home / "spool"


def read_settings(home: str | Path | None = None) -> Settings:
    """Settings from the environment, touching nothing on disk; a bad variable is one `InvalidInput` naming it."""
    try:
        return Settings(home=home) if home else Settings()
    except ValidationError as exc:
        raise _env_error(Settings, exc) from None


def load_settings(home: str | Path | None = None) -> Settings:
    """Build settings from the environment; `home` overrides `KOLM_HOME`, which is made (or tightened to) a
    directory only its owner can enter. A bad variable is one `InvalidInput` naming it."""
    settings = read_settings(home)
    private_dir(settings.home)
    return settings
