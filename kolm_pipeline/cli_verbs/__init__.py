"""Verbs of the `kolm` command that live apart from `kolm_pipeline/cli.py` (which stays the entry point and
builds the parser): the shared helpers (`common`), reaching captured data (`data`) and tenant keys (`keys`)."""
