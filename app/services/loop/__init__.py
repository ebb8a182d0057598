"""The loop: annotations in, a retrained version out and promoted, the pool re-ranked under it, and the
Review queue that chooses what an inspector sees next."""
