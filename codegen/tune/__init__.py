"""Tuning: the search space, the M buckets and the tuning tables (:mod:`.tables`), which config a call runs
(:mod:`.selection`), the sweep with its GPU measure step and report, and GPU timing."""
