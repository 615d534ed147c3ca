"""Streaming pretraining data: shards -> cluster sampling -> shuffle -> crop/mask -> token-budget packing."""
from .config import DataConfig
from .loader import PretrainLoader
from .sampling import cluster_pick

__all__ = ["DataConfig", "PretrainLoader", "cluster_pick"]
