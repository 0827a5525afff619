"""Backbones (timm ViTs, torchvision architectures), the DINO head, the multi-crop wrapper, released weights."""
