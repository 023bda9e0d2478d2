"""Kits the rest of the operator builds on, with no knowledge of its objects: the coalescing
work queue and the garbage collector's tuning."""
