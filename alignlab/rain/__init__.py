"""RAIN (Li et al., ICLR 2024): training-free alignment of a frozen LM by self-evaluated tree search (docs/rain.md)."""
