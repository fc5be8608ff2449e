"""Integrations with other libraries; each submodule imports its library only when used.

* :mod:`flashtile.integrations.transformers`: ``register()`` makes ``attn_implementation="flashtile"``
  available to Hugging Face transformers models (``pip install 'flashtile[hf]'``).
"""
