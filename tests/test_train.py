"""The training loop: config, recipe (parameter groups, LR schedule), resume exactness, logs, CLI errors."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from tiny_data import make_data

from memoryformer.core.config import ModelConfig
from memoryformer.core.model import LanguageModel
from memoryformer.train import (
    TrainConfig,
    WarmupCosine,
    build_optimizer,
    build_scheduler,
    decay_split,
    lr_at,
    paper_lr,
    train,
)
from memoryformer.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("train_data"))


def tiny_model(arch: str = "mf-test") -> ModelConfig:
    return ModelConfig.from_preset(arch, vocab_size=300)


def tiny_train(**changes) -> TrainConfig:
    base = dict(batch_size=2, seq_len=32, max_steps=6, eval_every=3, eval_batches=2, log_every=2, ckpt_every=3,
                keep_last=0, tensorboard=False, device="cpu", precision="fp32")
    return TrainConfig(**{**base, **changes})


# ---- TrainConfig -----------------------------------------------------------------------------------


def test_train_config_json_round_trip(tmp_path):
    tc = TrainConfig(batch_size=3, betas=(0.8, 0.99), lr=1e-3, warmup_steps=7, eval_batches=None, wandb="proj")
    again = TrainConfig.from_json(tc.to_json())
    assert again == tc and again.betas == (0.8, 0.99)
    tc.to_json(tmp_path / "t.json")
    assert TrainConfig.from_json(tmp_path / "t.json") == tc
    assert TrainConfig.from_json(TrainConfig().to_json()) == TrainConfig()


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(precision="fp8"), dict(betas=(0.9, 1.5)),
                                 dict(min_lr_ratio=2.0), dict(shuffle="nope"), dict(lr=-1.0)])
def test_train_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="TrainConfig"):
        TrainConfig(**bad)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"batch_sise": 2})


def test_paper_lr_presets():
    assert paper_lr("mf-tiny") == 3e-3 and paper_lr("mf-small") == 1.8e-3 and paper_lr("mf-base") == 9e-4
    assert paper_lr("pythia-70m") == 1e-3 and paper_lr("pythia-160m") == 6e-4 and paper_lr("pythia-410m") == 3e-4
    # configs are matched on size; 3 x the twin's LR for MemoryFormer
    assert paper_lr(ModelConfig.from_preset("mf-small").twin()) == 6e-4
    assert paper_lr(ModelConfig.from_preset("mf-demo")) == 3e-3 and paper_lr("pythia-demo") == 1e-3
    with pytest.raises(ValueError, match="unknown preset"):
        paper_lr("mf-huge")


# ---- recipe ------------------------------------------------------------------------------------------


def test_decay_groups_memoryformer():
    model = LanguageModel(tiny_model("mf-test"))
    decay, no_decay = decay_split(model)
    names = {n for n, _ in model.named_parameters()}
    assert set(decay) | set(no_decay) == names and not set(decay) & set(no_decay)
    # independent rule written from the official code's groups: tables, embedding and head decay; biases and norms do not
    expect_decay = {n for n in names if n.endswith(".table")} | {"embed.weight", "head.weight"}
    assert set(decay) == expect_decay
    assert {n for n in no_decay if n.endswith(".bias")} == {n for n in names if n.endswith(".bias")}
    assert "blocks.0.mlp.norm.weight" in no_decay and "blocks.0.attn_norm.weight" in no_decay
    assert "norm.weight" in no_decay

    opt = build_optimizer(model, TrainConfig(), 1e-3)
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert len(wd) == len(params)
    assert all(wd[id(params[n])] == 0.1 for n in decay) and all(wd[id(params[n])] == 0.0 for n in no_decay)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_decay_groups_pythia_and_tied():
    model = LanguageModel(tiny_model("pythia-test"))
    decay, no_decay = decay_split(model)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert f"{name}.weight" in decay and (module.bias is None or f"{name}.bias" in no_decay)
        if isinstance(module, torch.nn.LayerNorm):
            assert f"{name}.weight" in no_decay and f"{name}.bias" in no_decay
    tied = LanguageModel(tiny_model("mf-test").replace(tie_embeddings=True))
    decay, _ = decay_split(tied)
    assert "embed.weight" in decay and "head.weight" not in decay  # one shared tensor, listed once


def test_lr_schedule_values():
    # 101 steps, 10 warmup: updates 0..9 ramp (k + 1) / 10; 10 is the peak; cosine to 0.1 at update 100
    tc = TrainConfig(max_steps=101, warmup_steps=10, lr=2.0, min_lr_ratio=0.1)
    expect = {0: 0.2, 4: 1.0, 9: 2.0, 10: 2.0, 55: 2.0 * (0.1 + 0.9 * 0.5), 100: 0.2}
    for step, value in expect.items():
        assert lr_at(step, tc) == pytest.approx(value, rel=1e-12), step
    t = 30  # a point on the cosine, from the formula written out
    assert lr_at(t, tc) == pytest.approx(2.0 * (0.1 + 0.45 * (1 + math.cos(math.pi * (t - 10) / 90))))
    # warmup_frac: 1% of 1000 = 10 steps
    assert TrainConfig(max_steps=1000).resolved_warmup_steps == 10
    assert WarmupCosine(0, 5, 0.5)(0) == 1.0  # no warmup: start at the peak
    # the scheduler applies lr_at(k) to update k
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, tc, tc.lr)
    sched = build_scheduler(opt, tc)
    seen = []
    for _ in range(tc.max_steps):
        seen.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == seen[-1]
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(k, tc) for k in range(tc.max_steps)], rel=1e-12)


# ---- training ------------------------------------------------------------------------------------


def test_resume_gives_the_same_losses(data_dir, tmp_path):
    """2N steps straight == N steps, then resume, then N steps (CPU fp32)."""
    cfg, tc = tiny_model(), tiny_train(max_steps=6, eval_every=2, ckpt_every=0)
    straight = train(cfg, tc, data_dir, tmp_path / "a", progress=False, verbose=False)
    first = train(cfg, tc, data_dir, tmp_path / "b", stop_at_step=3, progress=False, verbose=False)
    assert first.step == 3 and not first.finished and first.weights is None
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [3]
    resumed = train(cfg, tc, data_dir, tmp_path / "b", resume=True, progress=False, verbose=False)

    assert straight.finished and resumed.finished and resumed.step == 6
    assert len(straight.losses) == len(resumed.losses) == 6
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-6, rel=0)
    assert resumed.lrs == pytest.approx(straight.lrs, rel=1e-12)
    assert [e["step"] for e in resumed.evals] == [2, 4, 6]
    assert [e["val_loss"] for e in resumed.evals] == pytest.approx([e["val_loss"] for e in straight.evals], abs=1e-6)
    assert resumed.tokens == straight.tokens == 6 * 2 * 32
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    # the losses really changed over training (the comparison is not between constants)
    assert straight.losses[-1] < straight.losses[0] - 0.3
    # the first call's log rows after step 3 were kept only once
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "b" / "metrics.csv")) if r["loss"]]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_run_directory_and_logs(data_dir, tmp_path):
    cfg = tiny_model("pythia-test")
    out = tmp_path / "run"
    result = train(cfg, tiny_train(max_steps=4, ckpt_every=1, keep_last=2, eval_every=2, tensorboard=True),
                   data_dir, out, progress=False, verbose=False)
    assert {p.name for p in out.iterdir()} >= {"config.json", "train_config.json", "tokenizer.json", "run.json",
                                               "metrics.csv", "history.json", "model.safetensors", "tb", "checkpoints"}
    assert ModelConfig.from_json(out / "config.json") == cfg
    assert TrainConfig.from_json(out / "train_config.json").max_steps == 4
    assert (out / "tokenizer.json").read_bytes() == (data_dir / "tokenizer.json").read_bytes()
    assert [s for s, _ in list_checkpoints(out)] == [3, 4]  # keep_last=2
    assert any((out / "tb").iterdir())

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    train_rows = [r for r in rows if r["loss"]]
    eval_rows = [r for r in rows if r["val_loss"]]
    assert [int(r["step"]) for r in train_rows] == [1, 2, 3, 4] and [int(r["step"]) for r in eval_rows] == [2, 4]
    assert all(float(r["tokens_per_s"]) > 0 and float(r["model_flops_per_s"]) > 0 for r in train_rows)
    assert float(eval_rows[-1]["val_ppl"]) == pytest.approx(math.exp(float(eval_rows[-1]["val_loss"])), rel=1e-4)

    history = json.loads((out / "history.json").read_text())
    assert history["losses"] == pytest.approx(result.losses) and history["val_loss"] == result.val_loss
    assert result.val_ppl == pytest.approx(math.exp(result.val_loss))
    assert result.tokens_per_s > 0 and result.model_flops_per_s == pytest.approx(result.tokens_per_s * result.flops_per_token)
    from memoryformer.research.flops import training_flops_per_token

    assert result.flops_per_token == training_flops_per_token(cfg, 32)
    state = load_checkpoint(list_checkpoints(out)[-1][1])
    assert state["step"] == 4 and state["sampler"]["position"] == 4 * 2
    assert state["train_config"]["lr"] == 1e-3  # resolved from the paper preset of the Pythia twin


def test_validation_loss_is_the_full_split_mean(data_dir, tmp_path):
    """eval_batches=None scores every non-overlapping val window: compare with a direct computation."""
    from memoryformer.data import TokenData
    from memoryformer.train import validation_loss

    torch.manual_seed(0)
    model = LanguageModel(tiny_model())
    data = TokenData(data_dir)
    res = validation_loss(model, data, 32, batch_size=5)
    tokens = torch.from_numpy(data.tokens("val").astype("int64"))
    n = (len(tokens) - 1) // 32
    x, y = tokens[: n * 32].view(n, 32), tokens[1: n * 32 + 1].view(n, 32)
    with torch.no_grad():
        logits, _ = model(x)
    direct = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert res["tokens"] == n * 32 and res["loss"] == pytest.approx(direct, rel=1e-5)


def test_resume_errors(data_dir, tmp_path):
    cfg, tc = tiny_model(), tiny_train(max_steps=2, eval_every=0)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(cfg, tc, data_dir, tmp_path / "r", resume=True, progress=False, verbose=False)
    train(cfg, tc, data_dir, tmp_path / "r", progress=False, verbose=False)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(cfg, tc, data_dir, tmp_path / "r", progress=False, verbose=False)
    with pytest.raises(CheckpointError, match="another model config.*d_model"):
        train(cfg.replace(d_model=32, n_heads=2), tc, data_dir, tmp_path / "r", resume=True, progress=False,
              verbose=False)
    # a damaged latest checkpoint is an error, not a silent fresh start
    latest = list_checkpoints(tmp_path / "r")[-1][1]
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        train(cfg, tc.replace(max_steps=4), data_dir, tmp_path / "r", resume=True, progress=False, verbose=False)


def test_input_errors(data_dir, tmp_path):
    tc = tiny_train(max_steps=1)
    with pytest.raises(ValueError, match="vocabulary \\(300 ids.*vocab_size 256"):
        train(ModelConfig.from_preset("mf-test"), tc, data_dir, tmp_path / "x", progress=False, verbose=False)
    with pytest.raises(ValueError, match="seq_len 100 is longer than the model's max_seq_len 64"):
        train(tiny_model(), tc.replace(seq_len=100), data_dir, tmp_path / "x", progress=False, verbose=False)
    with pytest.raises(FileNotFoundError, match="memoryformer prepare"):
        train(tiny_model(), tc, tmp_path / "nothing", tmp_path / "x", progress=False, verbose=False)


# ---- the command ---------------------------------------------------------------------------------------


def test_cli_train_and_resume(data_dir, tmp_path, capsys):
    from memoryformer.cli import main

    out = tmp_path / "cli"
    common = ["--no-progress", "--no-tensorboard", "--device", "cpu"]
    rc = main(["train", "--preset", "mf-test", "--vocab-size", "300", "--data", str(data_dir), "--out", str(out),
               "--max-steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0", "--lr", "1e-3",
               *common])
    assert rc == 0 and (out / "model.safetensors").is_file()
    # resume takes the model, data and settings from the run; --max-steps extends it
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "3", *common]) == 0
    state = load_checkpoint(list_checkpoints(out)[-1][1])
    assert state["step"] == 3 and state["train_config"]["seq_len"] == 16 and state["train_config"]["lr"] == 1e-3
    capsys.readouterr()

    def error_of(argv):
        assert main(["train", *argv, *common]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err  # one line
        return err[0]

    assert "unknown preset 'mf-huge'" in error_of(["--preset", "mf-huge", "--data", str(data_dir), "--out", str(tmp_path / "e")])
    assert "memoryformer prepare" in error_of(["--preset", "mf-test", "--data", str(tmp_path), "--out", str(tmp_path / "e")])
    assert "larger than the model's vocab_size 256" in error_of(
        ["--preset", "mf-test", "--data", str(data_dir), "--out", str(tmp_path / "e")])
    assert "max_seq_len 64" in error_of(["--preset", "mf-test", "--vocab-size", "300", "--data", str(data_dir),
                                         "--out", str(tmp_path / "e"), "--seq-len", "65"])
    assert "--preset" in error_of(["--data", str(data_dir), "--out", str(tmp_path / "e")])


def test_cli_out_of_memory_message(monkeypatch, tmp_path, data_dir, capsys):
    import memoryformer.train as train_module
    from memoryformer.cli import main

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train_module, "train", boom)
    rc = main(["train", "--preset", "mf-test", "--vocab-size", "300", "--data", str(data_dir),
               "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "out of memory" in err and "--batch-size" in err and "--grad-accum" in err and "--fsdp" in err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(data_dir, tmp_path, precision):
    """bf16 autocast and fp16 autocast + GradScaler run and learn (the GPU defaults, on the CPU)."""
    result = train(tiny_model(), tiny_train(max_steps=4, eval_every=0, precision=precision), data_dir,
                   tmp_path / precision, progress=False, verbose=False)
    assert result.precision == precision and all(math.isfinite(v) for v in result.losses)
    assert result.losses[-1] < result.losses[0]
    state = load_checkpoint(list_checkpoints(tmp_path / precision)[-1][1])
    assert (state["scaler"] is not None) == (precision == "fp16")
    assert state["model"]["embed.weight"].dtype == torch.float32  # autocast: fp32 master weights


def test_resume_auto_of_a_finished_run(data_dir, tmp_path):
    """The main job's pattern: resume="auto" reruns return the finished run's history without training."""
    cfg, tc = tiny_model(), tiny_train(max_steps=2, eval_every=0)
    first = train(cfg, tc, data_dir, tmp_path / "f", resume="auto", progress=False, verbose=False)
    again = train(cfg, tc, data_dir, tmp_path / "f", resume="auto", progress=False, verbose=False)
    assert again.finished and again.step == 2 and again.losses == first.losses and again.evals == first.evals
    assert again.tokens_per_s == first.tokens_per_s > 0
    assert [s for s, _ in list_checkpoints(tmp_path / "f")] == [2]
    for a, b in zip(first.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)


def test_cli_config_file(data_dir, tmp_path):
    from memoryformer.cli import main

    spec = {"model": tiny_model("pythia-test").to_dict(), "train": tiny_train(max_steps=1, eval_every=0).to_dict()}
    (tmp_path / "run.json").write_text(json.dumps(spec))
    out = tmp_path / "c"
    assert main(["train", "--config", str(tmp_path / "run.json"), "--data", str(data_dir), "--out", str(out),
                 "--no-progress"]) == 0
    assert ModelConfig.from_json(out / "config.json").architecture == "pythia"
    assert TrainConfig.from_json(out / "train_config.json").batch_size == 2


def test_wall_clock_checkpoints(data_dir, tmp_path):
    """ckpt_every_minutes saves whenever that much wall clock passed since the last save, besides ckpt_every."""
    cfg = tiny_model()
    tc = tiny_train(max_steps=4, eval_every=0, ckpt_every=0, ckpt_every_minutes=1e-9)  # due after every step
    train(cfg, tc, data_dir, tmp_path / "clock", progress=False, verbose=False)
    assert [s for s, _ in list_checkpoints(tmp_path / "clock")] == [1, 2, 3, 4]
    train(cfg, tc.replace(ckpt_every_minutes=0), data_dir, tmp_path / "off", progress=False, verbose=False)
    assert [s for s, _ in list_checkpoints(tmp_path / "off")] == [4]  # 0: off; the end always saves
    assert TrainConfig().ckpt_every_minutes == 30
    with pytest.raises(ValueError, match="ckpt_every_minutes must be >= 0"):
        TrainConfig(ckpt_every_minutes=-1)


def test_progress_lines_in_a_log(data_dir, tmp_path, capsys, monkeypatch):
    """Output that is not a terminal gets timed progress lines with tokens/s and ETA."""
    monkeypatch.setenv("MEMORYFORMER_PROGRESS_EVERY", "0")  # a line per update
    train(tiny_model(), tiny_train(max_steps=4, eval_every=0), data_dir, tmp_path / "p", progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: ")]
    assert any(line.startswith("train: 2/4 steps (50.0%)") and "tokens/s" in line and "ETA" in line
               for line in lines), lines
    assert any("loss " in line for line in lines)


def test_decay_rule_matches_the_module_rule():
    """p.dim() >= 2 gives the same groups as 'no decay on biases and norm-module parameters'."""
    from memoryformer.core.model import RMSNorm

    norms = (torch.nn.LayerNorm, RMSNorm)
    for arch in ("mf-test", "pythia-test"):
        model = LanguageModel(tiny_model(arch))
        by_module = {f"{m_name}.{p_name}" if m_name else p_name
                     for m_name, module in model.named_modules()
                     for p_name, _ in module.named_parameters(recurse=False)
                     if isinstance(module, norms) or p_name == "bias"}
        decay, no_decay = decay_split(model)
        assert set(no_decay) == by_module and not set(decay) & by_module and no_decay, arch


@pytest.mark.parametrize("max_norm", [1e-3, 1e9])
def test_clip_gradients_equals_torch_clip(max_norm):
    """The CPU fast path (multiply only when clipping) gives clip_grad_norm_'s norm and gradients, bitwise."""
    from memoryformer.train.optim import clip_gradients

    torch.manual_seed(0)
    grads = [torch.randn(300, 17), torch.randn(64), torch.randn(5, 5, 5)]
    ours = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for a, b, g in zip(ours, theirs, grads):
        a.grad, b.grad = g.clone(), g.clone()
    norm = clip_gradients(ours, max_norm, sharded=False)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    assert torch.equal(norm, expected)
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))
    assert (max_norm < 1) != all(torch.equal(a.grad, g) for a, g in zip(ours, grads))  # clipped iff below


def test_training_uses_fused_adamw_on_cpu(data_dir, tmp_path, monkeypatch):
    """On CPU (torch >= 2.4) the loop builds torch's fused AdamW, one pass per parameter."""
    from memoryformer.train import loop
    from memoryformer.train.optim import fused_adamw_supported

    built = []
    real = loop.build_optimizer

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(loop, "build_optimizer", spy)
    train(tiny_model(), tiny_train(max_steps=2), data_dir, tmp_path / "run", progress=False)
    assert fused_adamw_supported(torch.device("cpu")) == (tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 4))
    assert built[0].defaults["fused"] is (True if fused_adamw_supported(torch.device("cpu")) else None)


def test_training_step_takes_table_norms_from_the_backward(built, data_dir, tmp_path, monkeypatch):
    """The loop collects the kernels' table-gradient norms and clips with them (clip_and_step)."""
    from memoryformer import kernels
    from memoryformer.kernels.grad_norms import GradNormTally

    answers = []
    real = GradNormTally.sqnorm

    def spy(self, param):
        answers.append(real(self, param))
        return answers[-1]

    monkeypatch.setattr(GradNormTally, "sqnorm", spy)
    with kernels.backend("kernels"):
        train(tiny_model(), tiny_train(max_steps=2), data_dir, tmp_path / "run", progress=False)
    tables = sum(n.endswith(".table") for n, _ in LanguageModel(tiny_model()).named_parameters())
    assert sum(a is not None for a in answers) == 2 * tables
