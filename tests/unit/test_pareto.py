import numpy as np

from ray_crm.tune.pareto import pareto_front, pick


def test_front_on_a_hand_made_set():
    acc = np.array([0.90, 0.88, 0.85, 0.80, 0.89, np.nan])
    bias = np.array([0.50, 0.10, 0.05, 0.20, 0.50, 0.0])
    # 4 is dominated by 0 (same bias, lower accuracy); 3 by 1 and 2; 5 failed
    assert pareto_front(acc, bias).tolist() == [True, True, True, False, False, False]


def test_pick_least_biased_within_the_accuracy_budget():
    acc = np.array([0.90, 0.88, 0.85, np.nan])
    bias = np.array([0.50, 0.10, 0.05, 0.0])
    assert pick(acc, bias, 0.02) == 1
    assert pick(acc, bias, 0.10) == 2
    assert pick(acc, bias, 0.0) == 0
