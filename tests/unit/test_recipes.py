"""Recipes: complete, serialisable by name or JSON, and accepted by the step configs they feed."""

import pytest

from kfp_finetune.components.compare import recipes
from kfp_finetune.components.compare.recipes import DEFAULT_RECIPE, RECIPES, Recipe
from kfp_finetune.components.core.errors import UserError


def test_the_study_recipes_exist_and_round_trip_through_json() -> None:
    for name in ("head_only", "two_phase_bn_frozen", "two_phase_bn_train", "all_trainable", DEFAULT_RECIPE):
        recipe = Recipe.from_name(name)
        assert recipe.name == name and recipe.description
        assert Recipe.from_json(recipe.to_json()) == recipe
    assert RECIPES["head_only"].head_only and RECIPES["head_only"].fine_tune_kwargs() is None
    assert all(r.backbone_kwargs()["weights"] == "imagenet" for r in RECIPES.values())
    assert "scratch" not in RECIPES  # removed: it sat at chance (issue 16)
    assert RECIPES["all_trainable"].head_kwargs()["epochs"] == 0
    assert RECIPES["all_trainable"].fine_tune_kwargs()["learning_rate"] == 1e-3


def test_recipe_kwargs_build_valid_step_configs() -> None:
    from kfp_finetune.components.train import FineTuneConfig, HeadConfig

    for recipe in RECIPES.values():
        HeadConfig(dataset="d", backbone="b", output="o", seed=1, **recipe.head_kwargs())
        if recipe.fine_tune is not None:
            FineTuneConfig(dataset="d", model="m", output="o", seed=1, **recipe.fine_tune_kwargs())


def test_unknown_or_malformed_recipes_are_user_errors() -> None:
    with pytest.raises(UserError, match="head_only"):
        recipes.get("nope")
    with pytest.raises(UserError, match="not valid JSON"):
        Recipe.from_json("{")
    with pytest.raises(UserError, match="head has no recipe setting 'bogus'"):
        Recipe.from_json('{"name": "x", "description": "y", "head": {"bogus": 1}}')
    with pytest.raises(UserError, match="seed"):  # the run's setting, not a recipe's
        Recipe(name="x", description="y", head={"seed": 1})
    with pytest.raises(UserError, match="--label-smoothing must be in"):
        Recipe(name="x", description="y", fine_tune={"label_smoothing": 1.5})
    with pytest.raises(UserError, match="does not describe"):
        Recipe.from_json('{"name": "x", "description": "y", "colour": "red"}')
    with pytest.raises(UserError, match="weights"):
        Recipe(name="x", description="y", weights="random")
    with pytest.raises(UserError, match="0 epochs"):
        Recipe(name="x", description="y", head={"epochs": 0}, fine_tune=None)
