"""One-shot benchmarks that print measured figures: `speed` (plain vs drafters, tokens/s and tau side by side),
`controller` (ATLAS decision time per request-step), `suffix` (suffix drafter propose/update cost and memory)
over `suffix_replay` (exact greedy replay of token-only drafters). The drift benchmark has its own package
(`adaspec.core.drift`)."""
