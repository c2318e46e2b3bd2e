"""Quantisation policy: presets (llama.cpp's type rules), plans, recipes, bit budgets, importance matrices and the
bitsandbytes format.  Asks ``quantkit.converters`` about architectures; never runs a model."""
