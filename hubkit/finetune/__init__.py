"""Fine-tuning API: RunConfig, strategies, heads, ImageClassifierTask, checkpoints and export."""
from __future__ import annotations

from .checkpoint import CheckpointStore
from .config import RunConfig
from .heads import FCHead, GAPLinearHead, Head, SVMHead, make_head
from .metrics import classification_metrics
from .model import ClassifierModel
from .strategies import (STRATEGIES, FeatureExtractionStrategy, FreezeFirstK, FromScratch, FullFineTune, Strategy,
                         ULMFiT, make_strategy)
from .task import FinetuneResult, ImageClassifierTask

__all__ = ["RunConfig", "Strategy", "FeatureExtractionStrategy", "FreezeFirstK", "FullFineTune", "FromScratch", "ULMFiT",
           "STRATEGIES", "make_strategy", "Head", "FCHead", "GAPLinearHead", "SVMHead", "make_head",
           "ImageClassifierTask", "FinetuneResult", "ClassifierModel", "CheckpointStore", "classification_metrics"]
