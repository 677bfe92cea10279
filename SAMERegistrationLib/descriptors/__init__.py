"""Hand-crafted descriptors that stand in for the learned SAM embeddings (baselines)."""

from .mind import MINDConfig, mind_embed, mind_ssc

__all__ = ["MINDConfig", "mind_embed", "mind_ssc"]
