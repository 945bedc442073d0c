"""What every model card citeqa writes says about its training data's licence."""

from __future__ import annotations


def data_licence(made_from: str) -> str:
    """The card's licence paragraph for a model trained on ``made_from`` ("Demonstrations",
    "Examples"): SQuAD's attribution, which must stay, or a placeholder for other data."""
    return (f"{made_from} made from SQuAD (1.1 or 2.0: Rajpurkar et al. 2016; Rajpurkar, Jia, "
            "Liang 2018) carry its licence, CC BY-SA 4.0, and this attribution must stay; for "
            "other data, name its licence here: {DATA_LICENCE}.")
