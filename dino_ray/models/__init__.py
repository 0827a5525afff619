"""Backbones, the DINO head, the multi-crop wrapper and official weights."""
