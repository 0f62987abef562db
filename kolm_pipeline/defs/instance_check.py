"""Preflight for the Dagster instance: is the database that `dagster.yaml` names reachable?

dagster-postgres retries a failed connection several times and then reports "too many retries for DB
connection" without saying where it tried; with a host that drops packets each try waits for the TCP
timeout. `kolm distill`, `kolm demo` and `make ui` call `check_instance_reachable` first, so a wrong or
stopped database fails in seconds with a message naming the file, the setting and host:port.

Run as `python -m kolm_pipeline.defs.instance_check [DAGSTER_HOME]` (what `make ui` does).
"""

import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kolm_pipeline.provenance.errors import UserError

#: Seconds one connection attempt may take before the database counts as unreachable.
CONNECT_TIMEOUT_S = 3
#: Storage config keys of dagster-postgres and dagster-mysql, wherever they sit in dagster.yaml
#: (`storage: postgres:` or the older per-storage `run_storage: config:` form).
DATABASE_KEYS = ("postgres_url", "postgres_db", "mysql_url", "mysql_db")
DEFAULT_PORTS = {"postgres": 5432, "mysql": 3306}


class InstanceConfigError(UserError, ValueError):
    """dagster.yaml cannot be read or names an environment variable that is not set."""


class InstanceUnreachable(UserError, ValueError):
    """The database named in dagster.yaml does not answer: a configuration problem, reported in one line."""


@dataclass(frozen=True)
class DatabaseAddress:
    """Where one storage of the instance lives, and which setting of which file said so."""

    kind: str
    url: str
    host: str
    port: int
    setting: str
    config_path: Path


def _resolve_env(value: Any, setting: str, config_path: Path) -> Any:
    """Dagster's `{env: NAME}` indirection, resolved the same way (an unset variable is an error)."""
    if isinstance(value, Mapping) and set(value) == {"env"}:
        name = value["env"]
        resolved = os.environ.get(name)
        if resolved is None:
            raise InstanceConfigError(f"{config_path}: {setting} reads ${name}, which is not set")
        return resolved
    if isinstance(value, Mapping):
        return {key: _resolve_env(item, f"{setting}.{key}", config_path) for key, item in value.items()}
    return value


def _database_settings(config: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """(setting path, key, value) of every database setting in the parsed dagster.yaml."""
    if isinstance(config, Mapping):
        for key, value in config.items():
            setting = f"{path}.{key}" if path else str(key)
            if key in DATABASE_KEYS:
                yield setting, key, value
            else:
                yield from _database_settings(value, setting)


def _address(setting: str, key: str, value: Any, config_path: Path) -> DatabaseAddress:
    from sqlalchemy.engine import URL, make_url
    from sqlalchemy.exc import ArgumentError

    kind = key.split("_")[0]
    resolved = _resolve_env(value, setting, config_path)
    if key.endswith("_url"):
        try:
            url = make_url(str(resolved))
        except ArgumentError as exc:
            raise InstanceConfigError(f"{config_path}: {setting} is not a database URL: {exc}") from exc
        socket_dir = url.query.get("host")
        host = url.host or (socket_dir if isinstance(socket_dir, str) else None) or "localhost"
        port = url.port or DEFAULT_PORTS[kind]
        rendered = url.render_as_string(hide_password=False)
    else:
        if not isinstance(resolved, Mapping) or not resolved.get("hostname"):
            raise InstanceConfigError(f"{config_path}: {setting} needs at least `hostname`")
        host = str(resolved["hostname"])
        try:
            port = int(resolved.get("port") or DEFAULT_PORTS[kind])
        except ValueError as exc:
            raise InstanceConfigError(f"{config_path}: {setting}.port must be a number: {exc}") from exc
        rendered = ""
        if kind == "postgres":
            rendered = URL.create(
                "postgresql",
                username=resolved.get("username"),
                password=resolved.get("password") or None,
                host=host,
                port=port,
                database=resolved.get("db_name"),
                query={str(k): str(v) for k, v in (resolved.get("params") or {}).items()},
            ).render_as_string(hide_password=False)
    return DatabaseAddress(kind, rendered, host, port, setting, config_path)


def instance_databases(dagster_home: str | Path) -> list[DatabaseAddress]:
    """The databases `DAGSTER_HOME/dagster.yaml` stores the instance in (empty for SQLite storage)."""
    config_path = Path(dagster_home) / "dagster.yaml"
    if not config_path.is_file():
        return []
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InstanceConfigError(f"{config_path}: not valid YAML: {exc}") from exc
    addresses = [_address(setting, key, value, config_path) for setting, key, value in _database_settings(config)]
    return list({(a.host, a.port, a.url): a for a in addresses}.values())


def _postgres_problem(address: DatabaseAddress, timeout: float) -> str | None:
    """libpq's own reason when a PostgreSQL connection fails (refused, unknown host, auth, no database)."""
    import psycopg
    from sqlalchemy.engine import make_url

    conninfo = make_url(address.url).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        with psycopg.connect(conninfo, connect_timeout=max(2, int(timeout))):
            return None
    except psycopg.Error as exc:
        lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
        return lines[0] if lines else type(exc).__name__


def _tcp_problem(address: DatabaseAddress, timeout: float) -> str | None:
    import socket

    try:
        with socket.create_connection((address.host, address.port), timeout=timeout):
            return None
    except OSError as exc:
        return str(exc) or type(exc).__name__


def check_instance_reachable(dagster_home: str | Path, timeout: float = CONNECT_TIMEOUT_S) -> list[DatabaseAddress]:
    """Connect once to every database of the instance; raise `InstanceUnreachable` naming host:port if one
    does not answer within `timeout` seconds. Returns the databases checked."""
    addresses = instance_databases(dagster_home)
    for address in addresses:
        # A host that starts with "/" is a Unix socket directory: only libpq can try that one.
        problem = None if address.host.startswith("/") else _tcp_problem(address, timeout)
        if problem is None and address.kind == "postgres" and address.url:
            problem = _postgres_problem(address, timeout)
        if problem is not None:
            raise InstanceUnreachable(
                f"{address.config_path}: cannot connect to the Dagster instance's {address.kind} database at "
                f"{address.host}:{address.port} ({address.setting}): {problem}. "
                "Check that it is running and that the storage settings in that file are right."
            )
    return addresses


def main(argv: list[str] | None = None) -> int:
    """`make ui`'s preflight: exit 1 with one line when the instance's database is unreachable."""
    args = sys.argv[1:] if argv is None else argv
    home = Path(args[0] if args else os.environ.get("DAGSTER_HOME") or ".kolm/dagster")
    try:
        checked = check_instance_reachable(home)
    except (InstanceConfigError, InstanceUnreachable) as exc:
        print(f"kolm: error: {exc}", file=sys.stderr)
        return 1
    for address in checked:
        print(f"Dagster instance database {address.host}:{address.port} reachable ({address.setting})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
