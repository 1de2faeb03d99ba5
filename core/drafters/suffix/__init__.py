"""The model-free suffix drafter (after SuffixDecoding, arXiv 2411.04975), as one package.

Its public verbs are those of every drafter (`SuffixDrafter`: start / observe / propose / finish); the parts
behind it each hold one idea: `tree` (the incremental suffix index over token documents), `match` (following
a growing context through an index), `chain` (the greedy most-frequent continuation and its confidences),
`cache` (each tenant's bounded cache of past responses). `drafter` composes them.
"""

from adaspec.core.drafters.suffix.drafter import SuffixDrafter

__all__ = ["SuffixDrafter"]
