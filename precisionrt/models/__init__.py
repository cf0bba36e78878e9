"""Models, floor 5: what gets built and from where.

Owns the GPT factory (``gpt.py``: ``ModelConfig``, the ``[model]`` table, and ``build_gpt``), what every
builder shares (``transformer.py``: megatron's ``TransformerConfig`` for a device, placing a model), Hugging
Face checkpoints in and out (``hf/``: ``arch.py`` what a config.json asks for, ``names.py`` the name map,
``load.py`` ``from_hf``, ``save.py`` ``to_hf``) and tokenizers with their chat templates (``tokenizer.py``; templates render under a time and size budget:
``chat_template.py``).

May import: every floor below (``config``, ``observe``, ``numerics``, ``distributed``, ``layers``,
``runtime``), torch and megatron-core; transformers and safetensors only inside the functions that need them.
"""
