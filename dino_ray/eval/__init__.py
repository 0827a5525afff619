"""Evaluations of DINO features: feature extraction and weighted k-NN (the reference's eval_knn.py)."""
