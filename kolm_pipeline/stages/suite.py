"""`kolm eval`: the K-score table of any artifact against any eval suite (a recipe directory)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from kolm_pipeline.capture.images import image_store
from kolm_pipeline.corpus.recipe import load_recipe
from kolm_pipeline.evaluate.evaluation import evaluate_models
from kolm_pipeline.evaluate.judge import Judge
from kolm_pipeline.evaluate.result import KSCORE_LEGEND, side_by_side_lines
from kolm_pipeline.registry.artifact import extract_adapter, read_kolm
from kolm_pipeline.settings import Settings
from kolm_pipeline.train.base_model import resolve_base_model


def evaluate_artifact(settings: Settings, artifact: Path, suite: Path) -> str:
    """Evaluate the bare base and the artifact's adapter on the suite's eval split, same run."""
    if not artifact.is_file():
        raise FileNotFoundError(f"{artifact}: no such artifact")
    manifest = read_kolm(artifact).manifest
    recipe = load_recipe(suite)
    base = resolve_base_model(settings.base_model, settings.models_dir)
    with tempfile.TemporaryDirectory(prefix="kolm-eval-") as scratch:
        adapter = extract_adapter(artifact, Path(scratch) / "adapter")
        reports = evaluate_models(
            base,
            {"base": None, "artifact": adapter},
            recipe,
            size_budget_bytes=settings.size_budget_bytes,
            price_table=settings.price_table,
            student_dollars_per_hour=settings.student_dollars_per_hour,
            images=image_store(settings) if base.vision else None,
            judge=Judge.from_settings(settings, cache=None),
            inference_dtype=settings.inference_dtype,
        )
    lines = [f"artifact {artifact.name} (task {manifest.get('task')}) on {suite} "
             f"({len(recipe.eval)} eval cases, verifier {recipe.spec['verifier']})"]
    lines += side_by_side_lines([(name, reports[name].summary()) for name in ("base", "artifact")])
    lines.append(KSCORE_LEGEND)
    return "\n".join(lines)
