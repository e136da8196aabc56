"""White-box signals: per-sample exits, embeddings and last-layer gradients against autograd."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from mexit.attacks.whitebox import last_layer_gradient, whitebox_signals  # noqa: E402
from mexit.errors import InputError  # noqa: E402
from mexit.train.heads import tabular_exit_head  # noqa: E402
from mexit.train.multiexit import MultiExitNet  # noqa: E402
from mexit.train.threshold import simulate_exits  # noqa: E402

C = 4


def make_model(final_width: int = 8) -> MultiExitNet:
    """3 exits with ExitHeads (embedding 8, the final one ``final_width``), confidences spread over (0, 1)."""
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(12 if k == 0 else 16, 16), nn.ReLU()) for k in range(3)]
    heads = [tabular_exit_head(16, C, 8), tabular_exit_head(16, C, 8), tabular_exit_head(16, C, final_width)]
    with torch.no_grad():
        for head, factor in zip(heads, (4.0, 8.0, 4.0), strict=True):
            head.classifier.weight.mul_(factor)
    return MultiExitNet(stages, heads, arch="wb-test", input_shape=(12,), num_classes=C).eval()


@pytest.fixture
def inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(40, 12)).astype(np.float32) * 2, rng.integers(0, C, 40)


def all_probs(model: MultiExitNet, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        return [torch.softmax(t, 1).numpy() for t in model(torch.from_numpy(x))]


def test_exits_are_per_sample_and_match_the_rule(inputs: tuple) -> None:
    x, y = inputs
    model = make_model()
    probs = all_probs(model, x)
    tau = float(np.quantile(probs[0].max(1), 0.75))
    wb = whitebox_signals(model, x, y, threshold=tau, batch_size=7)
    assert np.array_equal(wb["exit_index"], simulate_exits(probs, tau))
    assert len(np.unique(wb["exit_index"])) == 3
    for k in range(3):
        at = wb["exit_index"] == k
        assert np.allclose(wb["probs"][at], probs[k][at], atol=1e-6)
    expected_loss = -np.log(wb["probs"][np.arange(40), y])
    assert np.allclose(wb["loss"], expected_loss, rtol=1e-4, atol=1e-5)


def test_gradient_equals_per_sample_autograd_and_is_not_accumulated(inputs: tuple) -> None:
    x, y = inputs
    model = make_model()
    tau = float(np.quantile(all_probs(model, x)[0].max(1), 0.75))
    wb = whitebox_signals(model, x, y, threshold=tau, batch_size=16)
    assert wb["gradient"].shape == (40, C * 8) and wb["gradient"].dtype == np.float32
    for i in range(len(x)):
        model.zero_grad()
        k = int(wb["exit_index"][i])
        logits = model(torch.from_numpy(x[i : i + 1]))[k]
        nn.functional.cross_entropy(logits, torch.tensor([int(y[i])])).backward()
        ref = model.heads[k].classifier.weight.grad.flatten().numpy()
        assert np.allclose(wb["gradient"][i], ref, atol=1e-5), f"sample {i}"
        with torch.no_grad():
            emb = model.heads[k].embedding(nn.Sequential(*model.stages[: k + 1])(torch.from_numpy(x[i : i + 1])))
        assert np.allclose(wb["embedding"][i], emb.numpy()[0], atol=1e-5)
    assert np.allclose(wb["gradient_norm"], np.linalg.norm(wb["gradient"], axis=1), rtol=1e-4)
    # a sample's gradient does not depend on which samples came before it (no accumulation)
    order = np.random.default_rng(1).permutation(40)
    again = whitebox_signals(model, x[order], y[order], threshold=tau, batch_size=5)
    assert np.allclose(again["gradient"], wb["gradient"][order], atol=1e-6)


def test_zero_padding_of_narrower_exits_and_norm_mode(inputs: tuple) -> None:
    x, y = inputs
    model = make_model(final_width=5)
    tau = float(np.quantile(all_probs(model, x)[0].max(1), 0.75))
    wb = whitebox_signals(model, x, y, threshold=tau, gradient="norm")
    assert wb["gradient"] is None and wb["embedding_widths"] == [8, 8, 5]
    last = wb["exit_index"] == 2
    assert last.any() and np.all(wb["embedding"][last, 5:] == 0)
    full = last_layer_gradient(wb["probs"], y, wb["embedding"])
    assert np.allclose(np.linalg.norm(full, axis=1), wb["gradient_norm"], rtol=1e-4)


def test_eval_mode_is_used_and_restored(inputs: tuple) -> None:
    x, y = inputs
    model = make_model()
    reference = whitebox_signals(model, x, y, threshold=0.6)
    model.train()  # dropout on: results must not change, and the mode must come back
    again = whitebox_signals(model, x, y, threshold=0.6)
    assert model.training
    assert np.array_equal(again["exit_index"], reference["exit_index"])
    assert np.allclose(again["gradient"], reference["gradient"])


def test_rejects_models_without_exit_heads() -> None:
    torch.manual_seed(0)
    plain = MultiExitNet([nn.Linear(3, 4)], [nn.Linear(4, 2)], arch="plain", input_shape=(3,), num_classes=2)
    with pytest.raises(InputError, match="ExitHead"):
        whitebox_signals(plain, np.zeros((2, 3), np.float32), np.zeros(2, int), threshold=0.5)
    with pytest.raises(InputError, match="labels"):
        whitebox_signals(make_model(), np.zeros((2, 12), np.float32), np.array([0, 9]), threshold=0.5)
