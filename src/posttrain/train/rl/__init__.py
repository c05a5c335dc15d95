"""`posttrain rl`: the single controller of online RL and the run around it.

controller.py (RLTrainer: one step, moving data between roles), run.py (checkpoints,
resume, the train loop, eval), collect.py (generate + reward + refill), setup.py (builds the
roles from an RLConfig), eval.py, trpo.py, prm_guide.py.
"""

from typing import Any

__all__ = ["RLConfig", "RLTrainer", "plan", "run_rl"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a submodule (e.g. the config's checks) never imports the
    # whole controller, and the config package can import train.rl pieces without a cycle.
    if name in __all__:
        from posttrain.train.rl import controller

        return getattr(controller, name)
    raise AttributeError(f"module 'posttrain.train.rl' has no attribute {name!r}")
