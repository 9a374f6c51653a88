"""The linear-layer micro-benchmark of the performance issue (see loraplug.bench.linear_stack).

OUT=results python benchmarks/linear_stack.py     # on the GPU machine
"""

from loraplug.bench import linear_stack

if __name__ == "__main__":
    linear_stack()
