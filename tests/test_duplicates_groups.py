"""The near-duplicate grouping helpers (vlsearch.ann.duplicates)."""

import numpy as np

from vlsearch.ann.duplicates import component_labels, first_of_each_group, near_duplicate_labels


def _unit(rows):
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_components_are_transitive_and_numbered_by_first_item():
    labels = component_labels(6, np.array([4, 1]), np.array([5, 4]))
    assert labels.tolist() == [0, 1, 2, 3, 1, 1]


def test_near_duplicate_labels_link_a_chain_above_the_threshold():
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([np.cos(0.3), np.sin(0.3), 0.0])   # cos(a, b) = 0.955
    c = np.array([np.cos(0.6), np.sin(0.6), 0.0])   # cos(b, c) = 0.955, cos(a, c) = 0.825
    d = np.array([0.0, 0.0, 1.0])
    labels = near_duplicate_labels(_unit([a, d, b, c]), 0.94)
    assert labels.tolist() == [0, 1, 0, 0]
    assert near_duplicate_labels(_unit([a, d, b, c]), 0.96).tolist() == [0, 1, 2, 3]
    assert first_of_each_group(labels).tolist() == [0, 1]


def test_empty_input():
    assert near_duplicate_labels(np.zeros((0, 4), np.float32), 0.9).tolist() == []
    assert first_of_each_group(np.zeros(0, np.int64)).tolist() == []
