"""The subcommands, one module each: resolve the inputs, plan, run the engine, commit.

``hf2mcore`` (import), ``mcore2hf`` (export), ``verify``, ``inspect``, ``planview`` (``streamconv plan``),
``generate`` and ``demo``. ``streamconv/cli.py`` parses the command line and calls them.
"""
