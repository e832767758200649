"""The built-in compressors, imported as ``bigain.plugins``.

They are registered through the public entry-point group ``bigain.compressors`` in the project's
``pyproject.toml``, exactly as a third-party plugin registers its own: the core package
(:mod:`bigain`) knows none of them by name.
"""
