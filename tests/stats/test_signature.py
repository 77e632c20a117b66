import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastwidth.stats.metrics import feature_kernel
from fastwidth.run import RunDir
from fastwidth.stats.signature import ProbeSpec, load_signature, probe_signature, save_signature, strided_index
from stats_toys import ToyLM, ToyMLP, teacher_data


def _spec(probe, **kw):
    args = dict(signature_points=10_000, kernel_points=13, sketch_dim=5, sketch_seed=7, eval_batch=7)
    args.update(kw)
    return ProbeSpec.build(probe, **args)


def test_classifier_signature_equals_offline():
    x, y = teacher_data(41)
    model = ToyMLP(6, 24, 4)
    spec = _spec({"x": x, "y": y}, signature_points=29)
    sig, summary = probe_signature(model, spec, "cpu", model.feature_points())
    with torch.no_grad():
        z = model(x)
        feats = model.features(x)
    idx = strided_index(41, 29)
    assert len(idx) == 29 and idx[0] == 0 and idx[-1] == 40
    zi, yi = z[idx], y[idx]
    np.testing.assert_allclose(sig["true_logit"], zi.gather(1, yi[:, None]).squeeze(1), rtol=1e-6)
    np.testing.assert_allclose(sig["loss"], F.cross_entropy(zi, yi, reduction="none"), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sig["centered_true_logit"], zi.gather(1, yi[:, None]).squeeze(1) - zi.mean(-1),
                               rtol=1e-5, atol=1e-6)
    assert sig["centered_true_logit"].dtype == torch.float32
    p = torch.softmax(zi, -1)
    np.testing.assert_allclose(sig["entropy"].float(), -(p * p.log()).sum(-1), rtol=2e-3, atol=1e-3)
    np.testing.assert_array_equal(sig["argmax"], zi.argmax(-1))
    r = torch.randn(4, 5, generator=torch.Generator().manual_seed(7)) / 5 ** 0.5
    np.testing.assert_allclose(sig["sketch"].float(), (zi - zi.mean(-1, keepdim=True)) @ r, rtol=2e-3, atol=2e-3)
    k_idx = strided_index(41, 13)
    want_k = feature_kernel(feats[k_idx])
    np.testing.assert_allclose(sig["kernel/layer1"].float(), want_k, rtol=2e-3, atol=2e-3)
    assert summary["loss"] == pytest.approx(float(F.cross_entropy(z, y)), rel=1e-5)
    assert summary["accuracy"] == pytest.approx(float((z.argmax(-1) == y).float().mean()))
    assert model.training  # mode restored


def test_token_signature_chunking_and_kernel_positions():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 11, (9, 5), generator=g)
    y = torch.randint(0, 11, (9, 5), generator=g)
    model = ToyLM(11, 16)
    one = probe_signature(model, _spec({"x": x, "y": y}, eval_batch=100, signature_points=17), "cpu",
                          model.feature_points())[0]
    many = probe_signature(model, _spec({"x": x, "y": y}, eval_batch=2, signature_points=17), "cpu",
                           model.feature_points())[0]
    for k in one:
        torch.testing.assert_close(one[k], many[k], rtol=1e-5, atol=1e-3)
    with torch.no_grad():
        z = model(x).reshape(45, 11)
        feats = model.features(x).reshape(45, 16)
    idx = strided_index(45, 17)
    np.testing.assert_allclose(one["true_logit"], z[idx].gather(1, y.reshape(-1)[idx, None]).squeeze(1), rtol=1e-6)
    # centered over the full vocabulary, not only the stored points' logits (an LM stores none)
    np.testing.assert_allclose(one["centered_true_logit"], one["true_logit"] - z[idx].mean(-1), rtol=1e-5, atol=1e-6)
    assert "logits" not in one
    want_k = feature_kernel(feats[strided_index(45, 13)])
    np.testing.assert_allclose(one["kernel/mix"].float(), want_k, rtol=2e-3, atol=2e-3)


def test_projection_is_width_and_run_independent():
    x, y = teacher_data(8)
    a = _spec({"x": x, "y": y}).projection(4, "cpu")
    b = _spec({"x": x, "y": y}).projection(4, "cpu")
    assert torch.equal(a, b)
    assert not torch.equal(a, _spec({"x": x, "y": y}, sketch_seed=8).projection(4, "cpu"))


def test_save_load_round_trip(tmp_path):
    x, y = teacher_data(12)
    model = ToyMLP(6, 8, 4)
    sig, _ = probe_signature(model, _spec({"x": x, "y": y}), "cpu", model.feature_points())
    path = RunDir(tmp_path).signature("w8_s0", 50)
    save_signature(path, sig, {"step": 50, "width": 8})
    back, meta = load_signature(path)
    assert meta == {"step": 50, "width": 8}
    assert back.keys() == sig.keys() and all(torch.equal(back[k], sig[k]) for k in sig)
    assert RunDir(tmp_path).list_signatures() == {"w8_s0": {50: path}}
