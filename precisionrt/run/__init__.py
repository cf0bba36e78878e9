"""What both training commands share, floor 6: a run from its directory to its summary.

Owns the run directory (contract C3, ``rundir.py``), what a resume may change and the record of each segment
(``resume.py``), checkpoints (``checkpoint.py``), the one-process lock of a run directory (``lock.py``), the memory estimate before allocation (``resources.py``), the
LM corpus (``data.py``), fault injection as configuration (contract C6, ``inject.py``) and the command
skeleton: the CLI runner and the open/step/finish of a run (``harness.py``, ``command.py``).

May import: every floor below. The commands (``precisionrt.train``, ``rl.train``) import it; nothing in
``precisionrt`` below imports it.
"""
