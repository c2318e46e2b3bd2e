"""Hugging Face checkpoint layer: safetensors shards read lazily and validated, the HF -> GGUF name table and its
transforms, tokenizers.  Imports the format layer only."""
