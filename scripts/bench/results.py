"""Reads the `RESULT name value` lines the Rust benches and their PyTorch peers print, round by
round, from files `<dir>/<side>.<round>` (shared by compare.sh and e2e.sh)."""

import statistics


def results(path):
    """{name: value} of the RESULT lines of one file."""
    d = {}
    with open(path) as f:
        for line in f:
            if line.startswith("RESULT "):
                _, k, v = line.split()
                d[k] = float(v)
    return d


def rounds(out, n):
    """[(rust, torch)] result dicts of rounds 1..n."""
    return [(results(f"{out}/rust.{r}"), results(f"{out}/torch.{r}")) for r in range(1, n + 1)]


def spread(values):
    """min, median, max."""
    return min(values), statistics.median(values), max(values)
