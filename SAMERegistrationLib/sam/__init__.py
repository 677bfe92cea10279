"""SAM: self-supervised anatomical embeddings (network, weights, embedding, matching, training)."""
