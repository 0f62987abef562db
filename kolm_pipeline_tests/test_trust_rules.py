"""Rules cannot stall the proxy (issue 19, item 6): a tenant's triage rule `--output-regex '^(a+)+$'` held the
proxy's interpreter for 12 s. Rule patterns now run on RE2 (linear time); a pattern RE2 cannot run is refused
when the rule is added, naming the pattern, and nothing is stored."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from kolm_pipeline.cli import main
from kolm_pipeline.provenance.errors import InvalidInput
from kolm_pipeline.store import CaptureStore
from kolm_pipeline_tests.test_store import capture


def test_a_catastrophic_pattern_runs_in_linear_time(tmp_path):
    """Applied in a child process with a deadline: a backtracking engine holds the GIL for as long as it runs,
    so only a process can be stopped, and a stall fails the test instead of hanging it."""
    url = f"sqlite:///{tmp_path / 'captures.db'}"
    store = CaptureStore(url)
    store.create_tenant("acme")
    store.insert_captures([capture(1, output_text="a" * 40 + "b"), capture(2, output_text="aaaa")])
    store.add_rule("acme", "support", "discard", {"output_regex": "^(a+)+$"}, "mallory")
    code = ("import json, sys; from kolm_pipeline.store import CaptureStore; "
            "print(json.dumps(CaptureStore(sys.argv[1]).apply_rules('acme', 'support')))")
    began = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("applying one tenant's rule took over 30 s")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"kept": 0, "discarded": 1}
    assert time.perf_counter() - began < 20


@pytest.mark.parametrize("pattern", [r"(a)\1", r"(?=a)a", r"(?<!x)y", "("])
def test_a_pattern_re2_cannot_run_is_refused_when_added(tmp_path, pattern):
    store = CaptureStore(f"sqlite:///{tmp_path / 'captures.db'}")
    store.create_tenant("acme")
    with pytest.raises(InvalidInput, match="invalid output_regex"):
        store.add_rule("acme", "support", "discard", {"output_regex": pattern}, "mallory")
    assert store.rules("acme", "support") == []


def test_the_cli_names_the_refused_pattern(kolm_settings, capsys):
    CaptureStore(kolm_settings.store_url).create_tenant("acme")
    assert main(["triage", "rule", "--namespace", "acme.support", "--discard", "--output-regex", r"(\w+) \1"]) == 1
    err = capsys.readouterr().err
    assert "invalid output_regex" in err and "Traceback" not in err
