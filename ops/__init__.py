"""Operations code: local server stack, demo and benchmarks (not part of the installed package)."""
