"""Problems: benchmark loaders (local files or the hub), the synthetic family, splits and the sampler."""
from megatron_meml.data.config import DataConfig
from megatron_meml.data.loaders import load_problems, load_splits, split_problems
from megatron_meml.data.rows import DataError
from megatron_meml.data.sampler import ProblemSampler

__all__ = ["DataConfig", "DataError", "ProblemSampler", "load_problems", "load_splits", "split_problems"]
