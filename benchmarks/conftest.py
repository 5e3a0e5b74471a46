import os
import sys

# the suites import the benchmark script and the published-structure baselines
HERE = os.path.dirname(__file__)
sys.path[:0] = [HERE, os.path.join(HERE, "..", "tests")]
