"""Verifiable tasks for RL. A task turns problems into byte prompts and scores completions in [0, 1]."""

from rl.envs.reverse import Problem, ReverseDigits, ReverseTaskConfig

__all__ = ["Problem", "ReverseDigits", "ReverseTaskConfig"]
