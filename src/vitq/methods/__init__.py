"""Quantization methods on top of the engine, one module each (SQ-b, OPT-m, Greedy MP, M2Q)."""
