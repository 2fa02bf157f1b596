"""Least-squares table fits (the converter's initialisation) against a float64 dense solve."""

import pytest
import torch

from memoryformer import MemoryLayer
from memoryformer.convert.least_squares import fit_memory_layer, fit_rows
from memoryformer.core.layer import memory_hash


def _dense_ridge_solve(rows, weights, targets, num_rows, lam, fit_bias=True):
    """min ||A T + 1 b - t||^2 + lam ||T||^2 with A[n, rows[n, k]] = w[n, k], written out densely."""
    n = rows.shape[0]
    A = torch.zeros(n, num_rows, dtype=torch.float64)
    A.scatter_add_(1, rows, weights)
    if fit_bias:
        A = torch.cat([A, torch.ones(n, 1, dtype=torch.float64)], 1)
    reg = torch.zeros(num_rows, A.shape[1], dtype=torch.float64)
    reg[:, :num_rows] = torch.eye(num_rows, dtype=torch.float64) * lam ** 0.5
    solution = torch.linalg.lstsq(torch.cat([A, reg]), torch.cat([targets, torch.zeros(num_rows, targets.shape[1],
                                                                                    dtype=torch.float64)])).solution
    return solution[:num_rows], (solution[num_rows] if fit_bias else None)


def test_conjugate_gradients_converge_to_the_float64_least_squares_solution():
    torch.manual_seed(0)
    x = torch.randn(300, 9, dtype=torch.float64)
    targets = torch.randn(300, 2, dtype=torch.float64) + x[:, :2] * 3
    rows, weights = memory_hash(x, 3, "prob")
    num_rows = 3 * 2 ** 3
    ridge = 1e-3
    table, bias, hit = fit_rows(rows, weights, targets, num_rows, iterations=400, ridge=ridge, fill_unhit=False)
    assert hit.all()
    lam = ridge * float((weights * weights).mean())
    ref_table, ref_bias = _dense_ridge_solve(rows, weights, targets, num_rows, lam)
    torch.testing.assert_close(table, ref_table, rtol=0, atol=1e-8)
    torch.testing.assert_close(bias, ref_bias, rtol=0, atol=1e-8)
    # and without a bias
    table0, bias0, _ = fit_rows(rows, weights, targets, num_rows, iterations=400, ridge=ridge, fit_bias=False,
                                fill_unhit=False)
    ref0, _ = _dense_ridge_solve(rows, weights, targets, num_rows, lam, fit_bias=False)
    torch.testing.assert_close(table0, ref0, rtol=0, atol=1e-8)
    assert not bias0.any()


def test_unhit_rows_get_their_tables_mean():
    torch.manual_seed(1)
    x = torch.randn(6, 8, dtype=torch.float64)  # 6 tokens cannot hit all 16 buckets of a table
    targets = torch.randn(6, 3, dtype=torch.float64)
    rows, weights = memory_hash(x, 4, "l1")
    table, _, hit = fit_rows(rows, weights, targets, 2 * 16, iterations=1)
    assert not hit.all()
    per_table = table.view(2, 16, 3)
    for k in range(2):
        mask = hit.view(2, 16)[k]
        torch.testing.assert_close(per_table[k, ~mask], per_table[k, mask].mean(0).expand(int((~mask).sum()), 3))


def test_fit_memory_layer_reproduces_a_function_of_its_chunks():
    """A target that IS a sum of per-chunk functions of the sign pattern is reproduced almost exactly."""
    torch.manual_seed(2)
    layer = MemoryLayer(16, 5, tau=4, weighting="prob").double()
    x = torch.randn(4000, 16, dtype=torch.float64)
    truth = MemoryLayer(16, 5, tau=4, weighting="prob").double()
    with torch.no_grad():
        truth.table.normal_()
        truth.bias.normal_()
        targets = truth(x)
    report = fit_memory_layer(layer, x, targets, iterations=100, ridge=1e-12)
    assert report["rel_err"] < 1e-6 and report["hit_share"] == 1.0
    torch.testing.assert_close(layer.table, truth.table, rtol=0, atol=1e-6)


def _run_cli(*argv):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "memoryformer.cli", "convert", *map(str, argv)],
                          capture_output=True, text=True)


def test_convert_verb_turns_a_dense_run_into_a_loadable_memoryformer(tmp_path):
    import json

    from tiny_data import make_data

    from memoryformer import LanguageModel, ModelConfig
    from memoryformer.train.checkpoint import load_model, save_model_weights

    data = make_data(tmp_path)
    torch.manual_seed(0)
    dense_cfg = ModelConfig.from_preset("pythia-test", vocab_size=300)
    dense_run = tmp_path / "dense"
    dense_run.mkdir()
    (dense_run / "config.json").write_text(dense_cfg.to_json())
    save_model_weights(LanguageModel(dense_cfg), dense_run / "model.safetensors", dense_cfg)
    out = tmp_path / "converted"
    proc = _run_cli(dense_run, "--data", data, "--out", out, "--tau", 4, "--calibration-tokens", 1024,
                    "--seq-len", 32, "--iterations", 5)
    assert proc.returncode == 0, proc.stderr
    assert "block 1: relative error q" in proc.stderr
    model, _ = load_model(out)
    assert model.config.architecture == "memoryformer" and model.config.d_model == dense_cfg.d_model
    dense, _ = load_model(dense_run)
    torch.testing.assert_close(model.embed.weight, dense.embed.weight, rtol=0, atol=0)
    info = json.loads((out / "convert.json").read_text())
    assert info["calibration_tokens"] == 1024 and len(info["blocks"]) == 2
    assert all(0 <= v < 1 for block in info["blocks"] for v in block.values())


def test_convert_verb_refuses_bad_arguments_in_one_line(tmp_path):
    for argv, message in [((), "either a dense model"), (("x", "--from-official", "y"), "either a dense model"),
                          (("x",), "needs --data"), (("x", "--data", "d", "--iterations", 0), "must be positive"),
                          (("missing", "--data", tmp_path), "does not exist")]:
        proc = _run_cli(*argv, "--out", tmp_path / "o")
        assert proc.returncode == 1 and message in proc.stderr, (argv, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_distillation_loss_against_a_written_out_float64_reference():
    from memoryformer.convert.distill import distillation_loss

    torch.manual_seed(3)
    s = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 7, dtype=torch.float64)
    y = torch.randint(0, 7, (2, 5))
    alpha, T = 0.3, 2.0
    loss = distillation_loss(s, t, y, alpha=alpha, temperature=T)
    ps, pt = (s / T).softmax(-1), (t / T).softmax(-1)
    kl = (pt * (pt.log() - ps.log())).sum(-1).mean()
    ce = -s.log_softmax(-1).gather(-1, y[..., None]).mean()
    reference = (1 - alpha) * ce + alpha * T * T * kl
    torch.testing.assert_close(loss.double(), reference, rtol=1e-6, atol=1e-6)
    (g,) = torch.autograd.grad(loss, s)
    (g_ref,) = torch.autograd.grad(reference, s)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-7)
    assert distillation_loss(s, t, y, alpha=0.0).item() == pytest.approx(ce.item(), rel=1e-6)
    for bad in (dict(alpha=1.5), dict(temperature=0.0)):
        with pytest.raises(ValueError):
            distillation_loss(s, t, y, **bad)


def test_training_from_a_converted_run_with_a_teacher(tmp_path):
    """--init-from starts from the converted weights; alpha = 0 is plain training; a distilled run resumes
    bit-exactly; a teacher with another vocabulary is refused in one line."""
    from tiny_data import make_data

    from memoryformer import LanguageModel, ModelConfig
    from memoryformer.convert.dense import convert_dense
    from memoryformer.train import TrainConfig, train
    from memoryformer.train.checkpoint import load_model, save_model_weights

    data = make_data(tmp_path)
    torch.manual_seed(0)
    dense_cfg = ModelConfig.from_preset("pythia-test", vocab_size=300)
    dense_run = tmp_path / "dense"
    dense_run.mkdir()
    dense = LanguageModel(dense_cfg)
    save_model_weights(dense, dense_run / "model.safetensors", dense_cfg)
    mf, _ = convert_dense(dense, torch.randint(0, 300, (4, 32)), tau=4, iterations=5)
    conv = tmp_path / "converted"
    conv.mkdir()
    save_model_weights(mf, conv / "model.safetensors", mf.config)

    base = dict(batch_size=2, seq_len=16, max_steps=4, eval_every=0, ckpt_every=2, tensorboard=False,
                device="cpu", precision="fp32", lr=1e-3)
    quiet = dict(progress=False, verbose=False)
    tiny_lr = train(mf.config, TrainConfig(**{**base, "lr": 1e-12, "max_steps": 1}, init_from=str(conv)), data,
                    tmp_path / "a", **quiet)
    for (name, p), q in zip(tiny_lr.model.state_dict().items(), mf.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-8, msg=name)
    plain = train(mf.config, TrainConfig(**base, init_from=str(conv)), data, tmp_path / "b", **quiet)
    alpha0 = train(mf.config, TrainConfig(**base, init_from=str(conv), teacher=str(dense_run), distill_alpha=0.0),
                   data, tmp_path / "c", **quiet)
    assert alpha0.losses == pytest.approx(plain.losses, rel=1e-6)
    distil = TrainConfig(**base, init_from=str(conv), teacher=str(dense_run), distill_alpha=0.7,
                         distill_temperature=2.0)
    straight = train(mf.config, distil, data, tmp_path / "d", **quiet)
    assert straight.losses != pytest.approx(plain.losses, rel=1e-3)
    train(mf.config, distil, data, tmp_path / "e", stop_at_step=2, **quiet)
    resumed = train(mf.config, distil, data, tmp_path / "e", resume=True, **quiet)
    assert resumed.losses == straight.losses
    model_e, _ = load_model(tmp_path / "e")
    model_d, _ = load_model(tmp_path / "d")
    for p, q in zip(model_e.state_dict().values(), model_d.state_dict().values()):
        assert torch.equal(p, q)

    other = ModelConfig.from_preset("pythia-test", vocab_size=280)
    bad_teacher = tmp_path / "bad"
    bad_teacher.mkdir()
    save_model_weights(LanguageModel(other), bad_teacher / "model.safetensors", other)
    with pytest.raises(ValueError, match="distillation needs the same tokenizer"):
        train(mf.config, TrainConfig(**base, teacher=str(bad_teacher)), data, tmp_path / "f", **quiet)
