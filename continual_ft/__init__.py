"""continual-ft: continual LoRA fine-tuning of language models."""
