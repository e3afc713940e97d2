"""Jacobi decoding for ``model.generate(..., custom_generate=<this folder's parent>, trust_remote_code=True)``.

transformers calls this ``generate`` with the raw arguments of ``model.generate``; it hands them back to
``model.generate`` with the ``jacobi_engine.hf.generate`` callable, which runs after HF's usual input
preparation. Engine settings (``block_size``, ``candidates``, ...) pass through as keyword arguments.
"""

import jacobi_engine.hf


def generate(model, *args, **kwargs):
    return model.generate(*args, custom_generate=jacobi_engine.hf.generate, **kwargs)
