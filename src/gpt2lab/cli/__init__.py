"""The ``gpt2lab`` command line: one module per subcommand, each a typed function whose docstring is its help."""
