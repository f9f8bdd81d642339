"""`rlpost run [RECIPE.yaml] [key=value ...]`: run the quickstart recipe (the built-in default)."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("recipe", nargs="?", help="recipe YAML (default: recipes/quickstart.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of recipe fields, e.g. rl.max_steps=50")
    parser.add_argument("--help-config", action="store_true", help="list every recipe key with type, default, help")


def run(args) -> int:
    from recipes import quickstart
    from rlpost.config import config_help

    if args.help_config:
        print(config_help(quickstart.QuickstartConfig))
        return 0
    argv = list(args.overrides)
    if args.recipe is not None:  # a recipe path, or the first override when no recipe is given
        argv.insert(0, args.recipe)
    quickstart.main(argv)
    return 0
