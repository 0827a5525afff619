"""The linear probe (eval_linear.py): feature order, head init, accuracy, and real training on CIFAR-10."""
import json

import pytest
import torch

from dino_ray import build_backbone
from dino_ray.core.models.backbones import get_intermediate_layers
from dino_ray.eval.linear import LinearArgs, LinearClassifier, accuracy, linear_features, run_linear

from .conftest import SAMPLE


def test_avgpool_interleaves_the_last_cls_token_and_the_patch_mean():
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 4, img_size=16, embed_dim=8, depth=3, num_heads=2).eval()
    images = torch.randn(2, 3, 16, 16)
    last_two = get_intermediate_layers(model, images, 2)
    cls, mean = last_two[-1][:, 0], last_two[-1][:, 1:].mean(dim=1)
    pooled = linear_features(model, images, 1, avgpool=True)
    assert pooled.shape == (2, 16)
    assert torch.allclose(pooled[:, 0::2], cls) and torch.allclose(pooled[:, 1::2], mean)  # 2i: CLS, 2i+1: mean
    plain = linear_features(model, images, 2, avgpool=False)
    assert torch.allclose(plain, torch.cat([last_two[0][:, 0], cls], dim=1))
    both = linear_features(model, images, 2, avgpool=True)  # the reference crashes here
    assert torch.allclose(both, torch.cat([last_two[0][:, 0], pooled], dim=1))


def test_classifier_init_and_accuracy_counts():
    torch.manual_seed(0)
    head = LinearClassifier(384, 1000)
    assert head.linear.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.count_nonzero(head.linear.bias) == 0
    output = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    top1, top5 = accuracy(output, torch.tensor([1, 2, 0]))  # top-5 capped at 3 classes
    assert (top1.item(), top5.item()) == (1, 3)


@pytest.fixture
def backbone_file(tmp_path):
    """A backbone-only file in the released layout (state dict, no prefix, no args)."""
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", 4, img_size=32, embed_dim=64, depth=2, num_heads=2)
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    return tmp_path / "backbone.pth"


def test_linear_probe_on_cifar10_beats_chance_resumes_and_reevaluates(backbone_file, tmp_path):
    args = LinearArgs(pretrained_weights=str(backbone_file), arch="vit_tiny", patch_size=4,
                      embed_dim=64, depth=2, num_heads=2, n_last_blocks=1,
                      avgpool_patchtokens=True, epochs=3, lr=0.5, batch_size_per_gpu=64, num_workers=0,
                      num_labels=10, train_data_path=str(SAMPLE / "train.parquet"),
                      val_data_path=str(SAMPLE / "val.parquet"), crop_size=32, resize_size=32,
                      output_dir=str(tmp_path / "linear"))
    first = run_linear(LinearArgs(**{**args.__dict__, "epochs": 2}), show_progress=False)
    stats = run_linear(args, show_progress=False)  # same output_dir, more epochs: resumes at epoch 2
    epochs = [json.loads(line)["epoch"] for line in open(tmp_path / "linear" / "log.txt")]
    assert epochs == [0, 1, 2]
    assert first["val_acc1"] > 0 and stats["best_acc1"] > 20.0  # 10 classes: chance is 10% (measured ~29%)
    again = run_linear(LinearArgs(**{**args.__dict__, "evaluate": True}), show_progress=False)
    assert again["acc1"] == pytest.approx(stats["val_acc1"])  # the saved head gives the same result
    with pytest.raises(FileNotFoundError, match="linear head"):
        run_linear(LinearArgs(**{**args.__dict__, "evaluate": True, "head_weights": str(tmp_path / "none.pth")}))
