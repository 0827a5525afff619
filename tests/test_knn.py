"""The weighted k-NN vote on hand-checkable cases, and the reference's crashes fixed."""
import math

import pytest
import torch

from dino_ray import knn_classifier
from dino_ray.eval.knn import knn_classifiers


def test_weighted_vote_by_hand():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[0.96, 0.28]])  # cosine 0.96 (label 0), 0.936 (label 1), 0.28 (label 1)
    # k=2: class 0 gets exp(0.96/T), class 1 gets exp(0.936/T): class 0 wins at T=0.07
    assert knn_classifier(train, labels, test, torch.tensor([0]), k=2, T=0.07) == (100.0, 100.0)
    # k=3 at a warm T: class 1 has two votes, exp(.936/T) + exp(.28/T) > exp(.96/T) for T=1
    assert math.exp(0.936) + math.exp(0.28) > math.exp(0.96)
    assert knn_classifier(train, labels, test, torch.tensor([0]), k=3, T=1.0) == (0.0, 100.0)


def test_features_are_normalised_inside():
    train = torch.tensor([[10.0, 0.0], [0.0, 0.1]])
    labels = torch.tensor([0, 1])
    top1, _ = knn_classifier(train, labels, torch.tensor([[0.0, 5.0]]), torch.tensor([1]), k=1, T=0.07)
    assert top1 == 100.0


def test_few_test_rows_and_any_number_of_classes():
    torch.manual_seed(0)
    centers = torch.randn(3, 8) * 5
    train_labels = torch.arange(3).repeat(10)
    train = centers[train_labels] + 0.1 * torch.randn(30, 8)
    test_labels = torch.tensor([2, 0, 1])  # 3 rows: the reference crashes below 100
    test = centers[test_labels]
    assert knn_classifier(train, train_labels, test, test_labels, k=5, T=0.07) == (100.0, 100.0)  # 3 classes, top-5


def test_chunking_does_not_change_the_result():
    torch.manual_seed(1)
    train, train_labels = torch.randn(500, 16), torch.randint(0, 7, (500,))
    test, test_labels = torch.randn(123, 16), torch.randint(0, 7, (123,))
    whole = knn_classifier(train, train_labels, test, test_labels, 20, 0.07)
    chunked = knn_classifier(train, train_labels, test, test_labels, 20, 0.07, max_chunk_elements=1000)
    assert whole == chunked


def test_no_test_rows_is_an_error():
    with pytest.raises(ValueError, match="no test features"):
        knn_classifier(torch.randn(3, 2), torch.tensor([0, 1, 0]), torch.empty(0, 2), torch.empty(0, dtype=torch.long),
                       1, 0.07)


def test_one_pass_over_several_k_equals_one_call_per_k():
    torch.manual_seed(2)
    train, train_labels = torch.randn(400, 16), torch.randint(0, 5, (400,))
    test, test_labels = torch.randn(90, 16), torch.randint(0, 5, (90,))
    together = knn_classifiers(train, train_labels, test, test_labels, [1, 10, 20, 500], 0.07, max_chunk_elements=5000)
    assert together == {k: knn_classifier(train, train_labels, test, test_labels, k, 0.07) for k in (1, 10, 20, 500)}
