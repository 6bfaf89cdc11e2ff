"""The label budget: which training groups (patients, cases) are labeled."""
from __future__ import annotations

import random

from lemis.errors import ConfigError

SPLIT_RULES = ("first", "random")


def budget_count(budget, n_groups: int) -> int:
    """Number of labeled groups of a budget: an integer is a count, a float in (0, 1] a fraction of the groups.

    ``labeled: 7`` is 7 patients, ``labeled: 0.1`` of 70 patients is 7 and ``labeled: 1.0`` all of them; a float
    outside (0, 1] (``2.5``, ``7.0``) is an error rather than a silent truncation to a count. None: every group
    (a dataset without a budget: all its training cases are labeled).
    """
    if budget is None:
        return n_groups
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ConfigError(f"data.init_args.labeled must be a count (integer) or a fraction in (0, 1], got {budget!r}.")
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ConfigError(f"data.init_args.labeled={budget} is neither a count (write an integer) nor a "
                              f"fraction in (0, 1] of the training patients/cases.")
        return round(budget * n_groups)
    return budget


def select_labeled(groups: list[str], budget: int | float | None, rule: str = "first", seed: int = 0) -> list[str]:
    """The labeled groups (patients / cases) of a budget, from ``groups`` in order of first appearance.

    budget: see ``budget_count``. rule ``first``: the first N groups in file order (reproduces SSL4MIS's
    3 -> 68 and 7 -> 136 slices); ``random``: N groups drawn with ``seed``.
    """
    if rule not in SPLIT_RULES:
        raise ConfigError(f"data.init_args.split_rule must be one of {SPLIT_RULES}, got {rule!r}.")
    unique = list(dict.fromkeys(groups))
    n = budget_count(budget, len(unique))
    if not 1 <= n <= len(unique):
        raise ConfigError(f"data.init_args.labeled={budget} is impossible: between 1 and {len(unique)} "
                          f"(the number of training patients/cases available) are needed.")
    if rule == "first":
        return unique[:n]
    return random.Random(seed).sample(unique, n)
