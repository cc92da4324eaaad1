"""Recipes: complete, serialisable by name or JSON, and accepted by the step configs they feed."""

import pytest

from components import recipes
from components.errors import UserError
from components.recipes import DEFAULT_RECIPE, RECIPES, Recipe


def test_the_study_recipes_exist_and_round_trip_through_json() -> None:
    for name in ("scratch", "head_only", "two_phase_bn_frozen", "two_phase_bn_train", "all_trainable", DEFAULT_RECIPE):
        recipe = Recipe.from_name(name)
        assert recipe.name == name and recipe.description
        assert Recipe.from_json(recipe.to_json()) == recipe
    assert RECIPES["head_only"].head_only and RECIPES["head_only"].fine_tune_kwargs() is None
    assert RECIPES["scratch"].backbone_kwargs()["weights"] == "none"
    assert RECIPES["all_trainable"].head_kwargs()["epochs"] == 0
    assert RECIPES["all_trainable"].fine_tune_kwargs()["learning_rate"] == 1e-3


def test_recipe_kwargs_build_valid_step_configs() -> None:
    from components.train import FineTuneConfig, HeadConfig

    for recipe in RECIPES.values():
        HeadConfig(dataset="d", backbone="b", output="o", seed=1, **recipe.head_kwargs())
        if recipe.fine_tune is not None:
            FineTuneConfig(dataset="d", model="m", output="o", seed=1, **recipe.fine_tune_kwargs())


def test_unknown_or_malformed_recipes_are_user_errors() -> None:
    with pytest.raises(UserError, match="head_only"):
        recipes.get("nope")
    with pytest.raises(UserError, match="not valid JSON"):
        Recipe.from_json("{")
    with pytest.raises(UserError, match="does not describe"):
        Recipe.from_json('{"name": "x", "description": "y", "head": {"bogus": 1}}')
    with pytest.raises(UserError, match="weights"):
        Recipe(name="x", description="y", weights="random")
    with pytest.raises(UserError, match="0 epochs"):
        Recipe(name="x", description="y", head=recipes.HeadSettings(epochs=0), fine_tune=None)


def test_the_default_recipe_is_the_default_everywhere() -> None:
    """HeadConfig/FineTuneConfig, the CLI, the components and the pipeline's parameters all follow `default`."""
    import argparse
    import dataclasses

    from components.train import FineTuneConfig, HeadConfig, add_cli, fine_tune_op, train_head_op
    from pipelines.pipeline import build_pipeline

    default = recipes.default_recipe()
    head, tune = default.head_kwargs(), default.fine_tune_kwargs()
    config_defaults = {f.name: f.default for f in dataclasses.fields(HeadConfig)}
    assert {k: config_defaults[k] for k in head} == head
    config_defaults = {f.name: f.default for f in dataclasses.fields(FineTuneConfig)}
    assert {k: config_defaults[k] for k in tune} == tune

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    head_args = vars(parser.parse_args(["train-head", "--dataset", "d", "--backbone", "b", "--output", "o"]))
    tune_args = vars(parser.parse_args(["fine-tune", "--dataset", "d", "--model", "m", "--output", "o"]))
    assert {k: head_args[k] for k in head} == head
    assert {k: tune_args[k] for k in tune} == tune

    def component_defaults(op) -> dict:
        return {k: v.default for k, v in op.component_spec.inputs.items() if v.default is not None}

    ops_head, ops_tune = component_defaults(train_head_op), component_defaults(fine_tune_op)
    assert {k: ops_head[k] for k in head} == head
    assert {k: ops_tune[k] for k in tune if k not in ("unfreeze_top", "unfreeze_from")} == {
        k: v for k, v in tune.items() if k not in ("unfreeze_top", "unfreeze_from")}
    assert ops_tune["unfreeze_top"] == (tune["unfreeze_top"] or 0)
    assert ops_tune["unfreeze_from"] == (tune["unfreeze_from"] or "")

    params = {k: v.default for k, v in build_pipeline().component_spec.inputs.items()}
    assert params["weights"] == default.weights
    assert (params["head_epochs"], params["head_learning_rate"], params["dropout"], params["augment"],
            params["class_weights"], params["batch_size"]) == (
        head["epochs"], head["learning_rate"], head["dropout"], head["augment"], head["class_weights"],
        head["batch_size"])
    assert (params["fine_tune_epochs"], params["fine_tune_learning_rate"], params["warmup_epochs"],
            params["batch_norm"], params["early_stopping_patience"], params["unfreeze_top"],
            params["unfreeze_from"]) == (
        tune["epochs"], tune["learning_rate"], tune["warmup_epochs"], tune["batch_norm"],
        tune["early_stopping_patience"], tune["unfreeze_top"] or 0, tune["unfreeze_from"] or "")
    assert params["label_smoothing"] == head["label_smoothing"] == tune["label_smoothing"]
