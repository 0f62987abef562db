"""The `kolm` command as a user meets it: usage errors, clear messages, the offline verbs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kolm_pipeline.cli import main

REPO = Path(__file__).resolve().parents[1]


def _kolm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kolm_pipeline.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize(
    "argv",
    [[], ["distill"], ["frobnicate"], ["compile"], ["triage", "keep", "--namespace", "a.b"],
     ["capture", "status"], ["swap", "--artifact", "x.kolm", "--strategy", "coin-flip"]],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: kolm" in capsys.readouterr().err


def test_help_explains_every_verb():
    result = _kolm("--help")
    assert result.returncode == 0
    for verb in ("capture", "tenant", "triage", "distill", "compile", "eval", "swap", "rollback", "registry",
                 "verify", "serve", "demo"):
        assert verb in result.stdout


def test_missing_base_model_path_is_named(kolm_settings, capsys):
    missing = "/nonexistent/base-model-dir"
    code = main(["--base", missing, "compile", "--recipe", str(REPO / "recipes" / "support-tickets"),
                 "--output", str(kolm_settings.home / "out.kolm")])
    err = capsys.readouterr().err
    assert code == 1 and missing in err and "Traceback" not in err
    assert not (kolm_settings.home / "out.kolm").exists()


def test_bad_recipe_line_is_named(tmp_path, capsys):
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "spec.json").write_text((REPO / "recipes" / "support-tickets" / "spec.json").read_text())
    (recipe / "train.jsonl").write_text("{not json\n")
    (recipe / "eval.jsonl").write_text("")
    assert main(["compile", "--recipe", str(recipe), "--dry-run"]) == 1
    assert f"{recipe / 'train.jsonl'}:1" in capsys.readouterr().err


def test_dry_run_accepts_example_recipe(capsys):
    assert main(["compile", "--recipe", str(REPO / "recipes" / "support-tickets"), "--dry-run"]) == 0
    assert "ready to compile" in capsys.readouterr().out


def test_verify_garbage_file_fails_cleanly(tmp_path, kolm_settings, capsys):
    garbage = tmp_path / "garbage.kolm"
    garbage.write_bytes(b"not an archive" * 100)
    assert main(["verify", str(garbage)]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "missing.kolm")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_tenant_triage_and_status(kolm_settings, ticket_store, capsys):
    assert main(["tenant", "create", "newco"]) == 0
    out = capsys.readouterr().out
    assert "kolm key (shown once" in out and (kolm_settings.keys_dir / "newco.pub").is_file()
    assert main(["tenant", "create", "newco"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["capture", "status", "--namespace", "acme.support", "--json"]) == 0
    assert '"untriaged": 160' in capsys.readouterr().out
    assert main(["triage", "rule", "--namespace", "acme.support", "--keep"]) == 0
    assert main(["capture", "status", "--namespace", "support", "--tenant", "acme", "--json"]) == 0
    assert '"kept": 160' in capsys.readouterr().out
    assert main(["capture", "status", "--namespace", "acme.support"]) == 0  # the human table
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == ["namespace acme.support", "captured  kept  discarded  untriaged  distilled  merged",
                         "     160   160          0          0          0       0"]
    assert "retention_days     30" in lines and "distill_threshold  1000" in lines
    assert main(["capture", "status", "--namespace", "Bad Namespace!"]) == 1


def test_triage_ids_stay_in_the_namespace_named(kolm_settings, ticket_store, capsys):
    """`kolm triage … --namespace acme.support ID` never changes a capture of the tenant's other namespaces."""
    from kolm_pipeline.demo.tickets import generate_tickets
    from kolm_pipeline_tests.conftest import capture_tickets

    capture_tickets(ticket_store, "acme", "billing", generate_tickets(2, seed=5))
    billing = [c.id for c in ticket_store.list_captures("acme", "billing")]
    support = ticket_store.list_captures("acme", "support")[0].id
    capsys.readouterr()
    assert main(["triage", "discard", "--namespace", "acme.support", str(support), *map(str, billing)]) == 0
    captured = capsys.readouterr()
    assert f"no capture(s) {sorted(billing)} in acme.billing" not in captured.err
    assert f"no capture(s) {sorted(billing)} in acme.support; skipped" in captured.err
    assert "1 of 3 captures marked discarded" in captured.out
    assert ticket_store.get_capture("acme", support).triage_state == "discarded"
    assert {ticket_store.get_capture("acme", i).triage_state for i in billing} == {"untriaged"}
    assert main(["triage", "tag", "--namespace", "acme.support", "--tag", "x", *map(str, billing)]) == 0
    assert all("x" not in ticket_store.get_capture("acme", i).tags for i in billing)


def test_registry_diff_of_an_unknown_task_is_one_clear_line(kolm_settings, capsys):
    assert main(["registry", "diff", "--task", "acme.nothing"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kolm: error:") and "acme.nothing" in err and "\n" not in err


def test_capture_status_recount(kolm_settings, ticket_store, capsys):
    """`kolm capture status --recount` stores the captures counted row by row and says what changed."""
    from sqlalchemy import delete

    from kolm_pipeline.store.tables import captures

    with ticket_store.engine.begin() as conn:  # rows gone without the counters hearing of it
        conn.execute(delete(captures).where(captures.c.id <= 10))
    assert main(["capture", "status", "--namespace", "acme.support", "--recount"]) == 0
    out = capsys.readouterr().out
    assert "recounted acme.support: captured 160 → 150, untriaged 160 → 150" in out
    assert "     150     0          0        150          0       0" in out.splitlines()
    assert main(["capture", "status", "--namespace", "acme.support", "--recount"]) == 0
    assert "recounted acme.support: no change" in capsys.readouterr().out
