"""The DINO training loop and its checkpoints (pure PyTorch; Ray wiring lives elsewhere)."""
