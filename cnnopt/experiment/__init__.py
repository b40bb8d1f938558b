"""Experiments: the experiment file (`config`) and the search-space declaration types (`space`)."""
