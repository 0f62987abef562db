"""Regression alerts, logged and POSTed as JSON to the configured webhook (``KOLM_ALERT_WEBHOOK``):

* ``kolm.regression``: the gate refused a candidate at Δ ≤ −0.03 (its body: ``result.RegressionAlert``);
* ``kolm.live_regression``: the live monitor saw a serving adapter score below its evaluation in
  production and rolled it back (or could not, and says why); its body is built in ``serve/monitor.py``.

Delivery failures are reported, never raised: an unreachable webhook must not hide the gate's decision.
"""

from __future__ import annotations

import logging

import httpx

log = logging.getLogger("kolm.alerts")


def send_alert(webhook: str | None, payload: dict, timeout: float = 5.0) -> str:
    """Log the alert and POST it as JSON; returns a one-line delivery status for metadata."""
    log.error("kolm alert %s for %s: %s", payload.get("kind"), payload.get("task"), payload.get("reason"))
    if not webhook:
        return "logged (no KOLM_ALERT_WEBHOOK configured)"
    try:
        response = httpx.post(webhook, json=payload, timeout=timeout)
    except httpx.HTTPError as exc:
        log.error("alert webhook %s unreachable: %s", webhook, exc)
        return f"webhook failed: {type(exc).__name__}"
    if response.status_code >= 400:
        log.error("alert webhook %s answered %s", webhook, response.status_code)
        return f"webhook answered {response.status_code}"
    return f"delivered ({response.status_code})"
