"""Distributed and device plumbing, floor 2: processes, groups, devices, and running a model fast.

Owns: bringing up torch.distributed and megatron's parallel state (``parallel.py``); the process groups the
runtime reduces over (``groups.py``); host synchronisation accounting and non-blocking copies (``syncs.py``);
clipping by the whole model's gradient norm (``clipping.py``); megatron's pipeline schedules on any device
(``pipeline.py``); ``torch.compile`` of a converted model (``compile.py``); CUDA-graph capture of ordinary
steps (``cuda_graphs.py``); the quiet megatron import every megatron user here runs first (``mcore.py``); the memory a device has
(``memory.py``: what the commands' estimates and ``from_hf`` check before they allocate).

May import: ``config``, ``observe``, ``numerics``, torch and megatron-core. Not ``layers`` or anything above.
"""
