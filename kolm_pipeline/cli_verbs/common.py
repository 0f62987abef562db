"""What every verb shares: the user-error type, the help formatter, settings and store for verbs that write
and for read-only verbs (which never create a kolm home or a store), and the one human table style."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kolm_pipeline.provenance.errors import UserError
from kolm_pipeline.settings import Settings, load_settings, read_settings


class CliError(UserError):
    """A user-facing error: printed as `kolm: error: …`, exit status 1."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default in `--help`, except where there is none to show (unset, a flag that is off)
    or the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if unset or "default" in text or isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An argument parser (and every sub-parser made from it) that shows defaults in `--help`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def default_actor() -> str:
    return os.environ.get("USER", "cli")


def settings_for_writing(args: argparse.Namespace) -> Settings:
    """Settings for a verb that writes: the kolm home is made (0700) if it does not exist yet."""
    if getattr(args, "base", None):
        os.environ["KOLM_BASE_MODEL"] = args.base
    return load_settings(args.home)


def settings_for_reading(args: argparse.Namespace) -> Settings:
    """Settings for a read-only verb: it refuses, and creates nothing, where there is no kolm home."""
    settings = read_settings(args.home)
    if not settings.home.is_dir():
        raise CliError(f"no kolm home at {settings.home}; set KOLM_HOME or --home")
    return settings


def open_store(settings: Settings):
    from kolm_pipeline.store import CaptureStore

    return CaptureStore(settings.store_url, source_weights=settings.source_weights)


def open_store_for_reading(settings: Settings):
    """The capture store, or, where the home has no SQLite store file yet, an empty one in memory: a read
    finds nothing, as it would in a fresh store, and no file is made."""
    from sqlalchemy.engine import make_url

    from kolm_pipeline.store import CaptureStore

    url = make_url(settings.store_url)
    on_file = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
    if on_file and not Path(url.database).expanduser().is_file():
        return CaptureStore("sqlite://", source_weights=settings.source_weights)
    return CaptureStore(settings.store_url, source_weights=settings.source_weights)


def namespace_of(args: argparse.Namespace) -> tuple[str, str]:
    """`--namespace tenant.namespace`, or `--namespace ns` with `--tenant`."""
    from kolm_pipeline.store import split_partition_key, validate_namespace, validate_tenant

    if "." in args.namespace:
        return split_partition_key(args.namespace)
    tenant = getattr(args, "tenant", None) or os.environ.get("KOLM_TENANT")
    if not tenant:
        raise CliError(f"--namespace {args.namespace!r} needs a tenant: write TENANT.{args.namespace} or pass --tenant")
    return validate_tenant(tenant), validate_namespace(args.namespace)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[str] = ()) -> str:
    """Rows under a header, columns padded to their widest cell (numbers in `right` aligned right); the one
    human style every verb that prints data uses (each also has `--json`)."""
    cells = [[str(header) for header in headers], *[["" if value is None else str(value) for value in row]
                                                    for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [cell.rjust(width) if header in right else cell.ljust(width)
                 for cell, width, header in zip(row, widths, headers, strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def clip(text: str, width: int) -> str:
    """One line of at most `width` characters."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
