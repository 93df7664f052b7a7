"""Online learning: Hedge Backpropagation's update rule, recovery from a concept shift, divergence, refusals,
and the learner turning a real prediction log with labels into a canary version."""

import copy
import json

import httpx
import numpy as np
import orjson
import pytest
import torch
from torch import nn

from conftest import wait_until
from leanserve import Repository
from leanserve.artifact import Provenance
from leanserve.cli import main
from leanserve.errors import InvalidInput
from leanserve.learn.learner import Learner, LearnerConfig, read_learn_events
from leanserve.learn.online import Diverged, HedgeMLP, OnlineConfig, OnlineLearner, hedge_update
from leanserve.monitor.store import LogConfig, PredictionLog

SWAP = {3: 5, 5: 8, 8: 3}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # one sample at a time: extra threads only add synchronisation (and these cores are shared)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_digits():
    from leanserve.demo import digits_dataset

    return digits_dataset(size=8, test_fraction=0.5)


@pytest.fixture(scope="module")
def mlp(small_digits):
    """A 64-32-16-10 MLP trained on half of the 8x8 digits (about 0.95 on the other half)."""
    x_train, _, y_train, _ = small_digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(15):
        for idx in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


def test_hedge_update_follows_the_papers_rule():
    # alpha_l * beta**loss_l: 0.5 * 0.99 = 0.495 and 0.5 * 0.99**2 = 0.49005, renormalised by 0.98505
    assert hedge_update([0.5, 0.5], [1.0, 2.0]) == pytest.approx([0.495 / 0.98505, 0.49005 / 0.98505])
    # floored at s/L = 0.2/3: the two weak heads (0.05 * 0.99**3 = 0.0485) are lifted to 0.0667 first
    floor = 0.2 / 3
    assert hedge_update([0.9, 0.05, 0.05], [0.0, 3.0, 3.0]) == pytest.approx(
        [0.9 / (0.9 + 2 * floor), floor / (0.9 + 2 * floor), floor / (0.9 + 2 * floor)])


def test_hbp_scales_each_heads_gradient_by_its_weight_and_hedges_on_the_heads_losses(mlp, small_digits):
    x = torch.from_numpy(small_digits[1][:1])
    learner = OnlineLearner(copy.deepcopy(mlp), (x,), OnlineConfig(algorithm="hbp", lr=0.5, replay_size=0))
    net = learner.module
    assert isinstance(net, HedgeMLP) and len(net.heads) == 2
    assert torch.allclose(net(x).softmax(-1), mlp(x).softmax(-1) * 0.5 + 0.05, atol=1e-5)  # new head starts uniform
    net.set_alpha([0.3, 0.7])
    before = copy.deepcopy(net)
    losses = [nn.functional.cross_entropy(z, torch.tensor([4])) for z in before.head_logits(x)]
    grads = [torch.autograd.grad(loss, list(head.parameters())) for loss, head in zip(losses, before.heads)]

    learner.learn_one((x,), 4)

    for alpha, head_before, head_after, grad in zip([0.3, 0.7], before.heads, net.heads, grads):
        for p0, p1, g in zip(head_before.parameters(), head_after.parameters(), grad):
            assert torch.allclose(p1, p0 - 0.5 * alpha * g, atol=1e-6)
    assert net.alpha.tolist() == pytest.approx(hedge_update([0.3, 0.7], [float(v) for v in losses]), abs=1e-6)


def test_ogd_steps_on_the_arriving_sample_plus_the_most_recent_samples_counted_as_replay_weight(mlp, small_digits):
    xs = torch.from_numpy(small_digits[1][:4])
    samples = [(xs[i:i + 1], label) for i, label in enumerate([3, 1, 4, 1])]
    config = OnlineConfig(lr=0.1, replay_size=2, replay_per_step=2, replay_weight=3.0)
    learner = OnlineLearner(copy.deepcopy(mlp), (xs[:1],), config, reference=samples[:2])

    def expected_step(arriving, replayed):
        model = copy.deepcopy(learner.module)

        def loss(x, y):
            return nn.functional.cross_entropy(model(x), torch.tensor([y]))

        total = loss(*arriving) + 3.0 * sum(loss(*s) for s in replayed) / len(replayed)
        grads = torch.autograd.grad(total, list(model.parameters()))
        return [p - 0.1 * g for p, g in zip(model.parameters(), grads)]

    # the buffer holds both reference samples; then the first of them leaves for the arriving one
    for arriving, replayed in ((samples[2], samples[:2]), (samples[3], [samples[1], samples[2]])):
        after = expected_step(arriving, replayed)
        learner.learn_one(*arriving)
        for p, q in zip(learner.module.parameters(), after):
            assert torch.allclose(p, q, atol=1e-6)


def _stream(small_digits, before=200, after=700, seed=0):
    _, x, _, y = small_digits
    order = np.random.default_rng(seed).permutation(np.tile(np.arange(len(x)), 2))[:before + after]
    xs, ys = x[order], y[order].copy()
    ys[before:] = [SWAP.get(int(v), int(v)) for v in ys[before:]]
    return torch.from_numpy(np.ascontiguousarray(xs)), ys


@pytest.mark.parametrize("algorithm", ["ogd", "hbp"])
def test_the_learner_recovers_from_a_label_swap_the_frozen_model_does_not(algorithm, mlp, small_digits):
    xs, ys = _stream(small_digits)
    learner = OnlineLearner(copy.deepcopy(mlp), (xs[:1],), OnlineConfig(algorithm=algorithm))
    correct = [learner.learn_one((xs[i:i + 1],), int(ys[i])) for i in range(len(ys))]
    with torch.no_grad():
        frozen = (mlp(xs).argmax(1).numpy() == ys)[-200:].mean()
    assert frozen < 0.75  # 3 of 10 classes relabelled
    assert np.mean(correct[-200:]) > max(0.88, frozen + 0.15)
    assert learner.samples_seen == len(ys)


def test_a_non_finite_loss_stops_the_learner(mlp, small_digits):
    xs, ys = _stream(small_digits, before=50, after=0)
    learner = OnlineLearner(copy.deepcopy(mlp), (xs[:1],), OnlineConfig(lr=1e30))
    with pytest.raises(Diverged, match="loss became (nan|inf).*registers nothing"):
        for i in range(len(ys)):
            learner.learn_one((xs[i:i + 1],), int(ys[i]))


def test_hbp_refuses_a_model_that_is_not_an_mlp(small_digits):
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    with pytest.raises(InvalidInput, match="needs an MLP classifier.*Conv2d.*--algorithm ogd"):
        OnlineLearner(cnn, (torch.from_numpy(small_digits[1][:1]),), OnlineConfig(algorithm="hbp"))


# --- the learner on a real repository and prediction log ---------------------------------------------

def _register_mlp(repo: Repository, module, example) -> None:
    """Version 1: the float MLP with its PyTorch source; version 2: its dynamic int8 optimization (no source,
    provenance parent 1 and the recipe), which serves."""
    from leanserve.from_torch import export
    from leanserve.optimize.recipe import Recipe, Step, apply_recipe
    from leanserve.optimize.steps import PassContext
    from leanserve.torch_source import save_source

    folder = repo.root.parent / "build"
    folder.mkdir()
    export(module, example, folder / "mlp.onnx", input_names=["image"], output_names=["logits"])
    repo.add(folder / "mlp.onnx", "mlp", attachments=[save_source(module, example, folder)])
    recipe = Recipe("dynamic int8", (Step("dynamic_int8"),))
    apply_recipe(recipe, folder / "mlp.onnx", folder / "int8.onnx", PassContext(repo.get("mlp", 1).signature))
    repo.add(folder / "int8.onnx", "mlp", provenance=Provenance(parent="mlp:1", recipe=recipe.to_dict()), serve=True)


def _log_labelled(db, xs, labels, served, version=2, prefix="r"):
    log = PredictionLog(LogConfig(db))
    try:
        for i, (x, label) in enumerate(zip(xs, labels)):
            log.record("mlp", version, f"{prefix}{i}", {"image": x[None]}, {"logits": served[i:i + 1]}, 1.0)
        log.flush()
        assert log.feedback("mlp", [(f"{prefix}{i}", label) for i, label in enumerate(labels)]).accepted == len(labels)
    finally:
        log.close()


def test_a_diverging_learner_stops_with_a_record_and_registers_nothing(tmp_path, mlp, small_digits):
    repo = Repository(tmp_path / "repo")
    xs, ys = _stream(small_digits, before=0, after=150)
    _register_mlp(repo, mlp, xs[:2])
    with torch.no_grad():
        _log_labelled(tmp_path / "log.db", xs.numpy(), ys, mlp(xs).numpy())
    learner = Learner(repo, "mlp", tmp_path / "log.db", LearnerConfig(OnlineConfig(lr=1e30), window=50))
    try:
        with pytest.raises(Diverged, match="registers nothing"):
            learner.poll()
    finally:
        learner.close()
    assert repo.versions("mlp") == [1, 2]
    assert read_learn_events(repo, "mlp")[-1]["action"] == "diverged"


def test_a_version_without_a_pytorch_source_is_refused_once(affine_repo, tmp_path, capsys):
    log = PredictionLog(LogConfig(tmp_path / "log.db"))
    x = np.ones((1, 4), np.float32)
    log.record("affine", 1, "a1", {"x": x}, {"y": 2 * x + 1, "s": x.sum(1, keepdims=True)}, 1.0)
    log.flush()
    log.feedback("affine", [("a1", 3)])
    log.close()
    args = ["learn", "affine", "--online", "--once", "--repo", str(affine_repo.root), "--db", str(tmp_path / "log.db")]
    assert main(args) == 1
    assert "affine:1 has no PyTorch source; register the model with `leanserve export" in capsys.readouterr().err
    learner = Learner(affine_repo, "affine", tmp_path / "log.db")
    try:
        reports = [learner.poll(), learner.poll()]
    finally:
        learner.close()
    assert all(r.refused and "no PyTorch source" in r.note for r in reports)
    assert [e["action"] for e in read_learn_events(affine_repo, "affine")] == ["refused"]  # reported once


def test_the_learner_registers_a_better_version_from_served_feedback_as_a_canary(tmp_path, mlp, small_digits,
                                                                                  live_server_factory, capsys):
    repo = Repository(tmp_path / "repo")
    xs, ys = _stream(small_digits, before=0, after=300, seed=1)
    _register_mlp(repo, mlp, xs[:2])
    server = live_server_factory(repo.root)
    for i in range(len(ys)):
        body = orjson.dumps({"id": f"q{i}", "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                                        "data": xs[i].numpy().ravel().tolist()}]})
        assert httpx.post(f"{server.url}/v2/models/mlp/infer", content=body, timeout=10).status_code == 200
    plog = server.server.prediction_log
    wait_until(lambda: plog.count("mlp") >= len(ys), what="requests logged")
    labels = [int(v) for v in ys] + [2.5]  # one label that is not a class index
    feedback = [{"id": f"q{i}", "label": label} for i, label in enumerate(labels[:-1])]
    feedback[-1]["label"] = labels[-1]
    assert httpx.post(f"{server.url}/v2/models/mlp/feedback", content=orjson.dumps({"feedback": feedback}),
                      timeout=10).status_code == 200

    args = ["learn", "mlp", "--online", "--once", "--window", "100", "--repo", str(repo.root)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "registered mlp:3, started as a guarded canary" in out and "not class indices 0..9 are skipped (got e.g. 2.5" in out

    version = repo.get("mlp", 3)
    learning = version.manifest.provenance.recipe["learning"]
    assert version.manifest.provenance.parent == "mlp:2" and learning["algorithm"] == "ogd"
    assert learning["samples_seen"] == len(ys) - 1 and learning["window_accuracy"] > learning["serving_window_accuracy"] + 0.02
    assert [s["op"] for s in version.manifest.provenance.recipe["steps"]] == ["dynamic_int8"]  # int8 again
    assert "torch_source.pt" in version.manifest.files
    rollout = repo.config("mlp").rollout
    assert rollout.active and (rollout.canary, rollout.primary) == (3, 2)
    assert main(args) == 0  # the canary is still out: nothing new registered
    assert repo.versions("mlp") == [1, 2, 3] and "still being rolled out" in capsys.readouterr().out
    assert [e["action"] for e in read_learn_events(repo, "mlp")].count("skipped") == 1
    assert json.loads((repo.root / "mlp" / ".rollout-events.jsonl").read_text().splitlines()[0])["action"] == "start"


def test_a_collapsed_learner_better_than_a_broken_serving_version_is_not_registered(tmp_path, mlp, small_digits):
    # the serving version's logged answers are always wrong; the learner answers class 0 for everything
    repo = Repository(tmp_path / "repo")
    xs, ys = _stream(small_digits, before=0, after=120)
    constant = copy.deepcopy(mlp)
    with torch.no_grad():
        for layer in constant:
            if isinstance(layer, nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
        constant[-1].bias[0] = 1.0
    _register_mlp(repo, constant, xs[:2])
    wrong = np.eye(10, dtype=np.float32)[(np.asarray(ys) + 1) % 10]
    _log_labelled(tmp_path / "log.db", xs.numpy(), ys, wrong)
    learner = Learner(repo, "mlp", tmp_path / "log.db", LearnerConfig(OnlineConfig(lr=1e-9), window=50, margin=0.0))
    try:
        with pytest.raises(Diverged, match="collapsed after .*predicts class 0 for all 50"):
            learner.poll()
    finally:
        learner.close()
    assert repo.versions("mlp") == [1, 2]
    assert read_learn_events(repo, "mlp")[-1]["action"] == "diverged"
