"""Image data without Ray: datasets (image folders, path lists, Parquet), the multi-crop augmentations, conversion."""
