"""Distributed, persistent hard-example store (paper step 5: accumulate hard examples, replay them with SFT)."""
from megatron_meml.hard_examples.config import HardExampleConfig
from megatron_meml.hard_examples.example import HardExample, uniform
from megatron_meml.hard_examples.persist import StoreCorruptError
from megatron_meml.hard_examples.store import HardExampleStore

__all__ = ["HardExample", "HardExampleConfig", "HardExampleStore", "StoreCorruptError", "uniform"]
