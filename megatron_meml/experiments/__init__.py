"""Applications over the stages: the embedded defaults, ``meml demo``, ``meml compare`` and ``meml plan``."""
