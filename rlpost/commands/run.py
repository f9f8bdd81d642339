"""`rlpost run [RECIPE.yaml] [key=value ...]`: run any recipe's stages (default: recipes/quickstart.yaml)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"


def add_arguments(parser) -> None:
    parser.add_argument("recipe", nargs="?", help="recipe YAML (default: recipes/quickstart.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=1 grpo.max_steps=50")
    parser.add_argument("--help-config", action="store_true", help="list every recipe key with type, default, help")


def run(args) -> int:
    from rlpost.recipe import load_recipe, recipe_help

    argv = list(args.overrides)
    recipe = args.recipe
    if recipe is not None and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        argv.insert(0, recipe)  # the first override, given without a recipe
        recipe = None
    recipe = Path(recipe) if recipe else DEFAULT_RECIPE
    if args.help_config:
        print(recipe_help(recipe))
        return 0
    loaded = load_recipe(recipe, argv)
    from rlpost.console import quiet_known_warnings
    from rlpost.pipeline import run_recipe

    quiet_known_warnings()
    run_recipe(loaded)
    return 0
