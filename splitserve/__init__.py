"""The `splitserve` command line (`cli.py`): a thin entry over router, bench and engine."""
