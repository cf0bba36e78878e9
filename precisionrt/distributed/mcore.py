"""Import megatron-core once, without its import-time notices about optional CUDA extensions (Transformer
Engine, Apex) that a CPU machine never has. Modules of precisionrt that use megatron import this first."""

import warnings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.tensor_parallel  # noqa: F401
