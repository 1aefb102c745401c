"""Tools that read finished runs: the results table, the paired statistics and the figures."""
