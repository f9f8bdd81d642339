"""The quickstart driven from Python: the same stages as `recipes/quickstart.yaml`, one call each.

    python -m recipes.quickstart [key=value ...]      (same overrides as `rlpost run`)

Start here to change what happens between stages (filter data, swap a stage, add a check);
`rlpost run` does the same through `rlpost.pipeline.run_recipe`, plus the resume bookkeeping
(skipping finished stages, refusing a changed recipe) and the final report and plot.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rlpost.console import quiet_known_warnings
from rlpost.pipeline import engine_settings, evaluate_point, initial_policy, in_stage_evaluation, resolve_device
from rlpost.recipe import load_recipe
from rlpost.stages import STAGES, StageContext
from rlpost.training_data import TrainingData


def main(argv: list[str]) -> None:
    recipe = load_recipe(Path(__file__).with_name("quickstart.yaml"), argv)
    quiet_known_warnings()
    run_dir = Path(recipe.run_dir)
    data = TrainingData(recipe.data, recipe.seed)
    policy = initial_policy(recipe, run_dir)
    evaluate_point(recipe, data, policy, run_dir, "initial")
    for entry in recipe.stage_entries:  # sft, then grpo: each starts from the previous output
        ctx = StageContext(recipe, entry.name, policy, run_dir / entry.name, data, resolve_device("auto"),
                           engine_settings=engine_settings(recipe), evaluate=in_stage_evaluation(recipe, data, policy))
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        record = STAGES[entry.type].run(getattr(recipe, entry.name), ctx)
        print(entry.name, {k: v for k, v in record.items() if isinstance(v, (int, float))})
        policy = ctx.out_dir / "policy"
        evaluate_point(recipe, data, policy, run_dir, entry.name)


if __name__ == "__main__":
    main(sys.argv[1:])
