"""Which way a train-rm metric improves: what Ray ranks its checkpoints by.

Kept apart from the trainer so that it imports neither torch nor Ray.
"""

from __future__ import annotations


def higher_is_better(name: str) -> bool:
    """Accuracies rise as a model improves; losses, penalties and bias measures fall."""
    return "accuracy" in name
