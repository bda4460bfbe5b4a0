"""Clustering of embeddings (spherical k-means with FAISS), cluster geometry (d_intra, d_inter) and the clusters
artifact format (``store.py``)."""
