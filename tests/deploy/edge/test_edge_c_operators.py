"""`leanserve edge --target c` on a MobileNet-style block: depthwise Conv, ReLU6 (Clip), a residual Add, average
and global average pooling, and Softmax/ArgMax heads, each compiled on the host and compared with ONNX
Runtime running the same int8 QDQ model."""

import json
import shutil

import numpy as np
import pytest

from leanserve import Repository
from leanserve.cli import main
from leanserve.deploy.edge.build import REPORT_JSON

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no host C compiler")


def _block():
    """Conv -> ReLU -> depthwise Conv -> ReLU6 -> pointwise Conv + residual Add -> AvgPool -> Conv -> ReLU ->
    GlobalAvgPool -> Flatten -> Gemm, for 1x8x8 digits."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c: int = 8) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.ReLU())
            self.depthwise = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.ReLU6())
            self.pointwise = nn.Conv2d(c, c, 1)
            self.pool = nn.AvgPool2d(2)
            self.conv = nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.ReLU())
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

        def forward(self, x):
            h = self.stem(x)
            h = h + self.pointwise(self.depthwise(h))
            return self.head(self.conv(self.pool(h)))

    return Block()


@pytest.fixture(scope="module")
def block_repo(tmp_path_factory):
    """The block trained briefly on scikit-learn's 8x8 digits, registered as logits:1, probs:1 (a Softmax head)
    and label:1 (an ArgMax head), with 540 labelled digits it was not trained on as evaluation data."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from leanserve.from_torch import export

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target.astype(np.int64), test_size=0.3,
                                                        random_state=0, stratify=digits.target)
    torch.manual_seed(0)
    block = _block()
    optimizer = torch.optim.Adam(block.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(block(torch.from_numpy(x_train)), torch.from_numpy(y_train)).backward()
        optimizer.step()
    block.eval()

    class ArgMax(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).argmax(1)

    folder = tmp_path_factory.mktemp("block")
    repo = Repository(folder / "repo")
    heads = {"logits": block, "probs": torch.nn.Sequential(block, torch.nn.Softmax(1)), "label": ArgMax(block)}
    for name, module in heads.items():
        # the TorchScript exporter writes GlobalAveragePool and Flatten; torch.export's lowers them to
        # ReduceMean and shape arithmetic the C target does not run
        export(module, torch.from_numpy(x_test[:2]), folder / f"{name}.onnx", input_names=["image"],
               output_names=[name], exporter="torchscript")
        repo.add(folder / f"{name}.onnx", name)
    np.savez(folder / "eval.npz", image=x_test, labels=y_test)
    return repo, folder


def _edge_c(repo, folder, name, capsys):
    status = main(["edge", name, "--target", "c", "--eval", str(folder / "eval.npz"), "--max-accuracy-drop", "2%",
                   "--repo", str(repo.root)])
    _, err = capsys.readouterr()
    assert status == 0, err
    return json.loads((repo.get(name, 2).path / REPORT_JSON).read_text())


@needs_cc
def test_a_mobilenet_block_becomes_c_that_agrees_with_onnx_runtime_int8(block_repo, capsys):
    report = _edge_c(*block_repo, "logits", capsys)
    assert {"Conv", "Clip", "Add", "AveragePool", "GlobalAveragePool", "Flatten", "Gemm"} <= set(report["operators"])
    assert {"conv", "add", "avg_pool", "dense"} <= set(report["layers"])
    agreement = report["agreement"]
    assert agreement["rows"] == report["holdout"]["rows"] > 100
    assert agreement["top1_agreement"] >= 0.995
    assert agreement["max_diff_steps"] <= 1  # the same rounding rule as ONNX Runtime's integer kernels
    assert report["holdout"]["c_int8"] > 0.85


@needs_cc
def test_a_softmax_head_becomes_c_whose_probabilities_match_onnx_runtime(block_repo, capsys):
    report = _edge_c(*block_repo, "probs", capsys)
    assert "Softmax" in report["operators"] and report["layers"][-1] == "softmax"
    agreement = report["agreement"]
    assert agreement["top1_agreement"] >= 0.995
    assert agreement["max_abs_diff"] < 1e-5  # the same int8 logits; only expf differs


@needs_cc
def test_an_argmax_head_becomes_c_that_names_the_same_class_as_onnx_runtime(block_repo, capsys):
    report = _edge_c(*block_repo, "label", capsys)
    assert "ArgMax" in report["operators"] and report["layers"][-1] == "argmax"
    assert report["agreement"]["top1_agreement"] >= 0.995
