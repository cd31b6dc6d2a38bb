"""ProsQA's closed vocabulary and the shape of its questions, as measured on the official
validation split (facebookresearch/coconut `data/prosqa_valid.json`, 300 questions).

Only the name sets and summary statistics are kept here, written out as data; no question, graph
or chain of the split is. The generator in `prosqa_distribution.py` draws from these tables, so it
needs no data file at run time. `tests/test_data.py` re-measures the split (when it is present)
and checks these name sets and the generated statistics against it.
"""
from __future__ import annotations

# The 38 made-up concept names and the 17 people the split uses (every one of them occurs).
CONCEPTS = (
    "bompus", "boompus", "brimpus", "chorpus", "dumpus", "felpus", "fompus", "gerpus", "gorpus", "grimpus",
    "gwompus", "hilpus", "impus", "jelpus", "jompus", "kerpus", "lempus", "lorpus", "numpus", "quimpus",
    "rempus", "rompus", "rorpus", "scrompus", "shumpus", "sterpus", "storpus", "terpus", "timpus", "tumpus",
    "vumpus", "worpus", "wumpus", "yerpus", "yimpus", "yumpus", "zhorpus", "zumpus",
)
PEOPLE = (
    "Alex", "Bob", "Carol", "Davis", "Eva", "Fae", "Gabriel", "Jack", "Max", "Oliver", "Polly", "Rex", "Sally",
    "Sam", "Stella", "Tom", "Wren",
)

# Measured frequencies (rounded), as {value: probability}.
STEPS = {3: 0.41, 4: 0.44, 5: 0.12, 6: 0.03}  # chain length = shortest root -> target distance
NUM_PEOPLE = {2: 0.60, 3: 0.31, 4: 0.07, 5: 0.02}
# shortest distance from another person to the distractor (never longer than the chain)
DISTRACTOR_DEPTH = {1: 0.21, 2: 0.53, 3: 0.24, 4: 0.02}
# edges from the part of the graph the root cannot reach into the part it can
CROSS_EDGES = {0: 0.27, 1: 0.19, 2: 0.25, 3: 0.12, 4: 0.08, 5: 0.05, 6: 0.03, 7: 0.01}

# Concepts per question and, of those, concepts the root reaches (mean, sd, min, max); the rest
# (7.9 +- 2.6) it cannot reach.
CONCEPTS_PER_QUESTION = (20.3, 1.85, 15, 25)  # (sd 2.1 measured; people and concepts co-vary)
REACHABLE_CONCEPTS = (12.4, 2.7, 5, 19)
# Mean number of reachable concepts at distance 1, 2, ... from the root (chain nodes included).
DEPTH_PROFILE = (3.0, 4.4, 3.3, 2.2, 1.4, 1.1)
DEEPER_THAN_TARGET = 0.3  # expected concepts one step deeper than the target (not below it)
# Facts into the target and into the distractor beyond the first one (the distractor has more).
TARGET_EXTRA_PARENTS = {0: 0.62, 1: 0.28, 2: 0.08, 3: 0.02}
DISTRACTOR_EXTRA_PARENTS = {0: 0.33, 1: 0.39, 2: 0.18, 3: 0.06, 4: 0.03, 5: 0.01}
# Facts beyond the spanning ones (each concept has one parent on its side): within the reachable
# part, and within the unreachable part (mean, sd), besides the answer nodes' extra parents.
EXTRA_REACHABLE_EDGES = (7.7, 3.5)
EXTRA_UNREACHABLE_EDGES = (4.8, 3.0)
