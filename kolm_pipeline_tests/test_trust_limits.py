"""Private state (issue 19, item 7): `captures.db` (with the tenants' HMAC secrets) and `mlflow.db` were
world-readable (0644). KOLM_HOME is now a directory only its owner can enter, and the databases kolm creates
are readable by their owner only."""

from __future__ import annotations

import stat

from kolm_pipeline.settings import load_settings
from kolm_pipeline.store import CaptureStore
from kolm_pipeline.tracking import mlflow_run


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_kolm_home_is_private_when_made_and_when_it_was_open(tmp_path):
    settings = load_settings(tmp_path / "new-home")
    assert _mode(settings.home) == 0o700
    opened = tmp_path / "old-home"
    opened.mkdir(mode=0o755)
    opened.chmod(0o755)
    assert _mode(load_settings(opened).home) == 0o700


def test_the_capture_store_and_mlflow_databases_are_owner_only(tmp_path):
    settings = load_settings(tmp_path / "home")
    store = CaptureStore(settings.store_url)
    store.create_tenant("acme")
    assert _mode(settings.home / "captures.db") == 0o600
    uri = f"sqlite:///{settings.home / 'mlflow.db'}"  # the embedded default, whatever the suite's environment says
    with mlflow_run(uri, "acme.support", settings.home / "mlflow-artifacts", "t", {}):
        pass
    assert _mode(settings.home / "mlflow.db") == 0o600


def test_opening_a_store_elsewhere_leaves_kolm_home_alone(tmp_path, monkeypatch):
    """Only the entry points' `load_settings` makes KOLM_HOME; a store opened on its own URL reads the settings
    it defaults from without creating or changing anything."""
    monkeypatch.setenv("KOLM_HOME", str(tmp_path / "not-made"))
    CaptureStore(f"sqlite:///{tmp_path / 'elsewhere' / 'captures.db'}").close()
    assert not (tmp_path / "not-made").exists()
