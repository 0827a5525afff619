"""Multi-crop augmentation and image datasets (ImageFolder, Parquet)."""
