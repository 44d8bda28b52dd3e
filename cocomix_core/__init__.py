"""cocomix_core: the CoCoMix library (data, models, concepts, training, evaluation, tracking).

Nothing in here imports Metaflow; every capability is a plain function or class.
"""

__version__ = "0.1.0"
