"""The version of flashtile: the one place it is written. ``pyproject.toml`` reads it from here
(setuptools' dynamic ``version``, parsed without importing the package); ``flashtile.__version__``
and ``flashtile --version`` report it."""

__version__ = "0.1.0"
