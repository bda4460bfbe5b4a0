"""The shard stage's library: planning over columns (order, shuffle, dedup, shard bounds), the per-sample
generator chain a task runs, and the tables and metrics finalize writes."""
