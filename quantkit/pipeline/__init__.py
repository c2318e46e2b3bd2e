"""Pipelines: HF directory or GGUF -> plan -> GGUF / bnb checkpoint (convert, requantise), importance collection and
sensitivity measurement."""
