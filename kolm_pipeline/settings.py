"""Every setting of kolm pipeline, read from `KOLM_*` environment variables with embedded defaults.

One place for configuration: the CLI, the Dagster resources and the servers all call `load_settings()`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from kolm_pipeline.provenance.errors import InvalidInput

EMBEDDED_BASE_MODEL = "embedded:smollm2-135m-instruct"

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


def load_source_weights() -> dict[str, float]:
    """`KOLM_SOURCE_WEIGHTS` over the defaults."""
    return parse_source_weights(os.environ.get("KOLM_SOURCE_WEIGHTS"))


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise InvalidInput(f"{name} must be an integer, got {raw!r}") from exc


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise InvalidInput(f"{name} must be a number, got {raw!r}") from exc


def _price_table() -> dict[str, tuple[float, float]]:
    """KOLM_PRICE_TABLE: JSON (inline or a file path) of {model prefix: [input $/Mtok, output $/Mtok]},
    merged over the defaults."""
    raw = os.environ.get("KOLM_PRICE_TABLE")
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


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise InvalidInput(f"{name} must be true or false, got {raw!r}")


@dataclass(frozen=True)
class CaptureConfig:
    """`record`: write captures at all (off only for benchmarks and dry runs); `max_body_bytes`: larger
    requests are refused with 413; `key_cache_ttl_s`: how long a kolm key lookup is reused (a revoked key
    stops working within it); `retention_sweep_s`: how often the server applies the retention windows
    (0: never, leave it to the `triaged_captures` asset); `batch_linger_s`: how long the writer lets a
    batch gather before one transaction writes it."""

    record: bool = True
    max_body_bytes: int = 8 * 1024 * 1024
    key_cache_ttl_s: float = 30.0
    batch_size: int = 200
    queue_size: int = 50_000
    replay_interval_s: float = 1.0
    retention_sweep_s: float = 3600.0
    batch_linger_s: float = 0.05


def load_capture_config() -> CaptureConfig:
    """The proxy's tuning from `KOLM_CAPTURE_*`."""
    return CaptureConfig(
        record=_env_bool("KOLM_CAPTURE_RECORD", True),
        max_body_bytes=_env_int("KOLM_CAPTURE_MAX_BODY_BYTES", 8 * 1024 * 1024),
        key_cache_ttl_s=_env_float("KOLM_CAPTURE_KEY_CACHE_TTL_S", 30.0),
        batch_size=_env_int("KOLM_CAPTURE_BATCH_SIZE", 200),
        queue_size=_env_int("KOLM_CAPTURE_QUEUE_SIZE", 50_000),
        replay_interval_s=_env_float("KOLM_CAPTURE_REPLAY_INTERVAL_S", 1.0),
        retention_sweep_s=_env_float("KOLM_CAPTURE_RETENTION_SWEEP_S", 3600.0),
        batch_linger_s=_env_float("KOLM_CAPTURE_BATCH_LINGER_S", 0.05),
    )


@dataclass(frozen=True)
class Settings:
    """Resolved configuration. Paths are absolute so child processes see the same files."""

    home: Path
    store_url: str
    base_model: str
    upstream_openai: str
    upstream_anthropic: str
    distill_threshold: int
    mlflow_tracking_uri: str
    size_budget_bytes: int
    student_dollars_per_hour: float
    retention_days: int
    model_cache: Path
    alert_webhook: str | None = None
    price_table: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_PRICE_TABLE))
    source_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SOURCE_WEIGHTS))

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
        return self.home / "keys"

    @property
    def work_dir(self) -> Path:
        """Per-namespace stage outputs: corpus, recipe, adapter, evaluation, receipts."""
        return self.home / "work"

    @property
    def models_dir(self) -> Path:
        """Cache of resolved base models (the dequantized embedded base lives here)."""
        return self.model_cache

    @property
    def spool_dir(self) -> Path:
        return self.home / "spool"


def load_settings(home: str | Path | None = None) -> Settings:
    """Build settings from the environment; `home` overrides `KOLM_HOME`."""
    root = Path(home or os.environ.get("KOLM_HOME") or ".kolm").expanduser().resolve()
    return Settings(
        home=root,
        store_url=os.environ.get("KOLM_STORE_URL") or f"sqlite:///{root / 'captures.db'}",
        base_model=os.environ.get("KOLM_BASE_MODEL") or EMBEDDED_BASE_MODEL,
        upstream_openai=os.environ.get("KOLM_UPSTREAM_OPENAI") or "https://api.openai.com/v1",
        upstream_anthropic=os.environ.get("KOLM_UPSTREAM_ANTHROPIC") or "https://api.anthropic.com",
        distill_threshold=_env_int("KOLM_DISTILL_THRESHOLD", 1000),
        mlflow_tracking_uri=os.environ.get("KOLM_MLFLOW_URI") or f"sqlite:///{root / 'mlflow.db'}",
        size_budget_bytes=_env_int("KOLM_SIZE_BUDGET_BYTES", 64 * 1024 * 1024),
        student_dollars_per_hour=_env_float("KOLM_STUDENT_DOLLARS_PER_HOUR", 0.10),
        retention_days=_env_int("KOLM_RETENTION_DAYS", 30),
        model_cache=Path(os.environ.get("KOLM_MODEL_CACHE") or root / "models").expanduser().resolve(),
        alert_webhook=os.environ.get("KOLM_ALERT_WEBHOOK") or None,
        price_table=_price_table(),
        source_weights=load_source_weights(),
    )
