"""The line: the one scoring contract (``inference``) and everything that judges a part through it
(`dmad predict`, `dmad serve`, the exported file), the per-class OK/NG thresholds, the feed into the
pool and its spool, and the serve token."""
