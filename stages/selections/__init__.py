"""Selections: which rows of a pool to keep, in DataComp's subset format and as tables with the reason for every
dropped row (``store.py``). Dedup and prune write them; export, the trainer and other prune steps read them."""
