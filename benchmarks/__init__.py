"""Side-by-side benchmarks: chatforge against its peers, in one process and one run, as ratios.

    python -m benchmarks                        # every benchmark (B1..B5), minutes
    python -m benchmarks --quick                # tiny sizes: a smoke test of the runner
    python -m benchmarks --only B2,B3           # some of them: B1, B1-converge, B2, B3, B4, B5

Each benchmark gives its peer the same shapes, weights, data, batch, precision and optimizer,
interleaves the two so that load from other processes hits both alike, and reports medians.
Results go to benchmarks/results/latest.json (merged with earlier runs of other benchmarks)
and, as Markdown with the machine, versions and command, to docs/benchmarks.md.
"""
