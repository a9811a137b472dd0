"""nanoalign: preference alignment for LLaVA-style vision-language models."""
