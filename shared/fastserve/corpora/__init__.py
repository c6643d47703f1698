"""Built-in corpora that need no upload: the stdlib docstrings (preprocessing builds datasets from it,
optimization measures on it)."""
