"""What to open after `make demo`: the block `kolm demo` prints last, and the default ports the `kolm`
command's servers listen on (one place, so the block and `--help` agree)."""

from __future__ import annotations

import json

from kolm_pipeline.settings import Settings

CAPTURE_PORT = 8600  # `kolm capture serve`: the capture proxy and the inbox
SERVE_PORT = 8700  # `kolm serve`: OpenAI-compatible serving of the deployed adapters
DAGSTER_UI_URL = "http://localhost:3000"  # `make ui` (UI_PORT=3000)
MLFLOW_UI_URL = "http://127.0.0.1:5000"  # `make mlflow`, unless KOLM_MLFLOW_UI_URL says otherwise


def open_next_lines(settings: Settings, kolm_key: str | None, task: str, messages: list[dict[str, str]]) -> list[str]:
    """A short block: the two UIs, the inbox with a working key, serving, and five lines of client code."""
    mlflow_url = getattr(settings, "mlflow_ui_url", "") or MLFLOW_UI_URL
    key = kolm_key or "KOLM_KEY"
    lines = [
        "",
        "Open next",
        "---------",
        f"  Dagster UI  make ui                        → {DAGSTER_UI_URL}",
        f"  MLflow UI   make mlflow                    → {mlflow_url}",
        f"  inbox       .venv/bin/kolm capture serve   → http://127.0.0.1:{CAPTURE_PORT}/inbox#key={key}",
        f"  serving     .venv/bin/kolm serve           → http://127.0.0.1:{SERVE_PORT}/v1, model {task}",
    ]
    if kolm_key:
        tenant = task.split(".")[0]
        lines.insert(3, f"  kolm key    {kolm_key}  (tenant {tenant}; shown once: `kolm tenant keys {tenant}` "
                        "lists its id)")
    lines += [
        "",
        "  import openai",
        f'  client = openai.OpenAI(base_url="http://127.0.0.1:{SERVE_PORT}/v1", api_key="{key}")',
        f"  messages = {json.dumps(messages, ensure_ascii=False)}",
        f'  reply = client.chat.completions.create(model="{task}", messages=messages)',
        "  print(reply.choices[0].message.content)",
    ]
    return lines
