"""Exceptions that mean "the input is wrong", which the CLI prints as one clear line."""

from kolm_pipeline.corpus.recipe import RecipeError
from kolm_pipeline.corpus.stages import NotEnoughPairs
from kolm_pipeline.registry.deploy import DeployRefused
from kolm_pipeline.registry.errors import RegistryError
from kolm_pipeline.train.base_model import BaseModelError
from kolm_pipeline.train.distill import TrainingError

USER_ERRORS: tuple[type[Exception], ...] = (
    RecipeError,
    NotEnoughPairs,
    DeployRefused,
    RegistryError,
    BaseModelError,
    TrainingError,
    ValueError,
    FileNotFoundError,
)
