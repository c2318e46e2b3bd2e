"""GGUF format layer: the spec tables, the streaming reader and writer, tensor roles, atomic output files and
llama.cpp's quantisation kernels (ggml).  Knows no model family; imports only ``quantkit.errors``."""
