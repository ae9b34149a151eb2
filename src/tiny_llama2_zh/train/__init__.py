"""Training recipes; every stage shares the plumbing in `common.py`."""
