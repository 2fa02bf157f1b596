"""Official MemoryFormer checkpoints (GPT-NeoX / DeepSpeed layout) load into our model unchanged."""

import subprocess
import sys

import pytest
import torch

from memoryformer import LanguageModel, ModelConfig
from memoryformer.integrations.official import load_official, official_config, read_official_layers
from memoryformer.train.checkpoint import load_model

# our name -> the official one, written out independently of the converter's table
OURS_TO_OFFICIAL = {
    "attn_norm.weight": "input_layernorm.scale",
    "attn.q_proj.table": "attention.query_proj.tables", "attn.q_proj.bias": "attention.query_proj.bias",
    "attn.k_proj.table": "attention.key_proj.tables", "attn.k_proj.bias": "attention.key_proj.bias",
    "attn.v_proj.table": "attention.value_proj.tables", "attn.v_proj.bias": "attention.value_proj.bias",
    "mlp_norm.weight": "post_attention_layernorm.scale",
    "mlp.ml1.table": "mlp.0.tables", "mlp.ml1.bias": "mlp.0.bias",
    "mlp.norm.weight": "mlp.1.weight", "mlp.norm.bias": "mlp.1.bias",
    "mlp.ml2.table": "mlp.2.tables", "mlp.ml2.bias": "mlp.2.bias",
}


def official_layers(model: LanguageModel) -> dict[int, dict[str, torch.Tensor]]:
    """The pipeline layout of the official code: 0 embedding, 1 a function (no weights), 2..L+1 blocks,
    L+2 a function, L+3 the final norm, L+4 the head; plus the rotary buffer the official blocks save."""
    L = model.config.n_layers
    state = model.state_dict()
    layers = {0: {"word_embeddings.weight": state["embed.weight"].clone()}}
    for i in range(L):
        block = {OURS_TO_OFFICIAL[k.split(".", 2)[2]]: v.clone() for k, v in state.items()
                 if k.startswith(f"blocks.{i}.")}
        block["attention.rotary_emb.inv_freq"] = torch.ones(4)
        layers[i + 2] = block
    layers[L + 3] = {"norm.scale": state["norm.weight"].clone()}
    layers[L + 4] = {"final_linear.weight": state["head.weight"].clone()}
    return layers


@pytest.fixture
def reference():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("mf-test", vocab_size=300, weighting="l1", rms_norm_eps=1e-8, norm_eps=1e-5,
                                  max_seq_len=2048, n_heads=8)
    model = LanguageModel(cfg).eval()
    with torch.no_grad():  # non-zero biases and norms, so a swapped name cannot hide
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _same_logits(a: LanguageModel, b: LanguageModel) -> None:
    idx = torch.randint(0, a.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(a(idx)[0], b(idx)[0], rtol=0, atol=0)


def test_per_layer_files_load_with_the_same_logits(tmp_path, reference):
    folder = tmp_path / "global_step10"
    folder.mkdir()
    for index, layer in official_layers(reference).items():
        torch.save(layer, folder / f"layer_{index:02d}-model_00-model_states.pt")
    (tmp_path / "latest").write_text("global_step10")
    cfg = official_config(read_official_layers(tmp_path))
    assert (cfg.tau, cfg.expanding_bits, cfg.n_layers, cfg.weighting, cfg.d_model) == (4, 2, 2, "l1", 64)
    _same_logits(reference, load_official(tmp_path, n_heads=8))


def test_single_state_dict_and_the_cli_verb(tmp_path, reference):
    flat = {f"sequential.{i}.{k}": v for i, layer in official_layers(reference).items() for k, v in layer.items()}
    ckpt = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": flat}, ckpt)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "memoryformer.cli", "convert", "--from-official", str(ckpt),
                           "--out", str(out), "--n-heads", "8"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    converted, _ = load_model(out)
    _same_logits(reference, converted)
    again = subprocess.run([sys.executable, "-m", "memoryformer.cli", "convert", "--from-official", str(ckpt),
                            "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 1 and "not empty" in again.stderr and "Traceback" not in again.stderr


def test_bad_official_inputs_get_one_line(tmp_path, reference):
    layers = official_layers(reference)
    layers[2]["attention.mystery.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save({f"sequential.{i}.{k}": v for i, layer in layers.items() for k, v in layer.items()}, bad)
    with pytest.raises(ValueError, match="unexpected official parameter 'attention.mystery.weight'"):
        load_official(bad)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(bad.read_bytes()[:100])
    for path, message in [(truncated, "not a readable tensor-only checkpoint"), (tmp_path, "no layer_XX"),
                          (tmp_path / "missing.pt", "does not exist")]:
        proc = subprocess.run([sys.executable, "-m", "memoryformer.cli", "convert", "--from-official", str(path),
                               "--out", str(tmp_path / "o")], capture_output=True, text=True)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
