"""cocomix_core: the CoCoMix library (data, models, concepts, training, evaluation, tracking).

Nothing in here imports Metaflow; every capability is a plain function or class.
"""

from pathlib import Path

__version__ = "0.1.0"
# The checkout (or install) root: default homes of the MLflow store and the artifacts folder.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
