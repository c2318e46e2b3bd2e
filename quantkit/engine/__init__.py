"""Model engines: llama.cpp through llama-cpp-python (eval sessions, run limits, load checks, runtime, chat) and the
transformers reference runtime."""
