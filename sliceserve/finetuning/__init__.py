"""Recovery fine-tuning of our checkpoints (LoRA through PEFT), written back in our format."""
