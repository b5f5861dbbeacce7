"""Fine-tuning API: RunConfig, strategies, heads, ImageClassifierTask, checkpoints and export."""
from __future__ import annotations

from ..models.classifier import ClassifierModel
from ..models.heads import FCHead, GAPLinearHead, Head, LinearProbe, LogisticHead, SVMHead, make_head
from .advise import Advice, BackboneScore, advise, rank_backbones
from .auto import AutoResult, Candidate, auto_finetune, parse_duration
from .checkpoint import CheckpointStore
from .config import RunConfig
from .lr_finder import LRFinderResult
from .metrics import classification_metrics
from .strategies import (
    LPFT,
    STRATEGIES,
    FeatureExtractionStrategy,
    FreezeFirstK,
    FromScratch,
    FullFineTune,
    Strategy,
    ULMFiT,
    make_strategy,
)
from .task import FinetuneResult, ImageClassifierTask

__all__ = ["RunConfig", "Strategy", "FeatureExtractionStrategy", "FreezeFirstK", "FullFineTune", "FromScratch", "ULMFiT",
           "LPFT", "STRATEGIES", "make_strategy", "Head", "FCHead", "GAPLinearHead", "SVMHead", "LogisticHead",
           "LinearProbe", "make_head",
           "ImageClassifierTask", "FinetuneResult", "ClassifierModel", "CheckpointStore", "classification_metrics",
           "auto_finetune", "AutoResult", "Candidate", "parse_duration", "LRFinderResult",
           "advise", "Advice", "rank_backbones", "BackboneScore"]
