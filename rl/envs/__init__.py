"""Verifiable tasks for RL. A task turns problems into byte prompts and scores completions in [0, 1]."""

from rl.envs.addition import Addition
from rl.envs.reverse import ReverseDigits
from rl.envs.task import STOP, Problem, Task, TaskConfig


def make_task(config: TaskConfig) -> Task:
    """The task ``config.name`` names."""
    return {"reverse_digits": ReverseDigits, "addition": Addition}[config.name](config)


__all__ = ["Addition", "Problem", "ReverseDigits", "STOP", "Task", "TaskConfig", "make_task"]
