"""The benchmark's arithmetic (FLOPs, peaks, roofline), its timing loop, and a tiny end-to-end run."""
import importlib.util
import json

import jax
import pytest

from gptjax import bench
from gptjax.bench import BenchConfig, format_table
from gptjax.config import GPTConfig, get_config
from gptjax.measure import alternate, decode_bytes_per_step, flops_per_token, matmul_params, peak_flops
from gptjax.model import num_params

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
TINY = dict(emb_dim=32, n_heads=4)


def test_matmul_params_is_nanogpts_n_for_a_tied_head():
    tied = get_config("gpt2-small", tie_embeddings=True, qkv_bias=True)
    assert matmul_params(tied) == num_params(tied, exclude_embeddings=True) == 123_653_376  # nanoGPT's 123.65M
    untied = get_config("gpt2-small")
    assert matmul_params(untied) == num_params(untied) - 50257 * 768 - 1024 * 768  # the lookup table does no FLOPs
    # padded vocab columns are wasted work, not model FLOPs
    assert matmul_params(GPTConfig.from_dict({**tied.to_dict(), "vocab_multiple": 64})) == matmul_params(tied)
    assert flops_per_token(tied, 1024) == 6 * 123_653_376 + 12 * 12 * 1024 * 768


def test_peak_table_and_roofline_bytes():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", "float32") == 156e12
    assert peak_flops("TPU v5 lite", "bfloat16") == 197e12
    assert peak_flops("Tesla V100-SXM2-16GB", "bfloat16") == 125e12  # no bf16 units: its fp16 peak
    assert peak_flops("cpu", "float32") is None
    cfg = get_config("gpt2-small", tie_embeddings=True, qkv_bias=True)
    assert decode_bytes_per_step(cfg, 1, 0, 4, 4) == 4 * matmul_params(cfg)
    assert decode_bytes_per_step(cfg, 2, 10, 2, 2) == 2 * matmul_params(cfg) + 2 * 12 * 2 * 10 * 768 * 2


def test_alternate_runs_round_robin():
    calls = []
    times = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert [len(v) for v in times.values()] == [3, 3]


@pytest.mark.slow
@pytest.mark.parametrize("torch_process", ["auto", "same"])
def test_tiny_end_to_end_run(tmp_path, torch_process):
    if torch_process != "auto" and not HAS_TORCH:
        pytest.skip("PyTorch's rows need torch and transformers")
    bc = BenchConfig(model_overrides=TINY, n_layers=2, context_length=16, steps=2, warmup=1, decode_batches=(1, 2),
                     decode_prompt=4, decode_tokens=6, nocache_tokens=3, decode_rounds=1, torch=HAS_TORCH,
                     torch_compile=False, parts=("bandwidth", "train", "decode"), weight_dtypes=("float32",),
                     torch_process=torch_process)
    result = bench.run(bc, tmp_path / "bench", log=lambda s: None)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert (tmp_path / "bench.png").stat().st_size > 0 and "### train" in (tmp_path / "bench.md").read_text()
    assert saved["device"]["platform"] == "cpu" and saved["bandwidth"]["read_GBps"] > 0
    b = saved["bandwidth"]  # measured again before decoding; the roofline takes the best repetition
    assert b["roofline_GBps"] == max(m["read_best_GBps"] for m in (b, b["before_decode"])) or \
        b["roofline_GBps"] == max(m["copy_best_GBps"] / 2 for m in (b, b["before_decode"]))
    assert b["roofline_GBps"] >= max(b["read_GBps"], b["copy_GBps"] / 2)
    train = [r for r in result["rows"] if r["part"] == "train" and r["framework"] == "gptjax" and "step_ms" in r]
    assert len(train) == 1 and train[0]["tokens_per_s"] > 0 and train[0]["compile_s"] > 0
    assert train[0]["flops_per_token"] == flops_per_token(bc.model_config(), 16) and train[0]["mfu"] is None
    count = next(r for r in result["rows"] if r.get("variant") == "compilations in a run")
    assert (count["train_step_programs"], count["eval_step_programs"]) == (1, 1)  # no retracing across steps
    decode = {(r["framework"], r["variant"], r["batch"]): r for r in result["rows"] if r["part"] == "decode"}
    for B in (1, 2):
        cached = decode[("gptjax", "kv-cache", B)]
        assert cached["tokens_per_s"] > 0 and cached["vs_no_cache"] > 0 and 0 < cached["roofline_fraction"]
    if HAS_TORCH:
        torch_row = next(r for r in result["rows"] if r["part"] == "train" and r["framework"] == "pytorch")
        assert torch_row["tokens_per_s"] > 0 and train[0]["vs_pytorch_best"] > 0
        assert torch_row["steps"] == 2 and torch_row["params"] > 0
        # on CPU, auto times PyTorch in a process of its own, after gptjax
        own = torch_process == "auto"
        assert torch_row["process"] == ("own" if own else "shared") and ("own-process" in torch_row["variant"]) == own
        assert decode[("gptjax", "kv-cache", 1)]["vs_pytorch"] > 0
    assert "compilations in a training loop" in format_table(result)


def test_variant_rows_carry_their_own_dtype_shape_and_changes():
    # a variant's row is measured and labelled with its own config, not the base one's
    bc = BenchConfig(model_overrides=TINY, n_layers=1, context_length=16, steps=1, warmup=0, torch=False,
                     parts=("train",), variants=({"dtype": "bfloat16", "context_length": 8, "drop_rate": 0.0},))
    rows = [r for r in bench.bench_train(bc, log=lambda s: None) if "step_ms" in r]
    base, var = rows
    assert (base["dtype"], base["T"], base["variant"]) == ("float32", 16, "attn=auto")
    assert (var["dtype"], var["T"], var["variant"]) == ("bfloat16", 8, "attn=auto drop_rate=0.0")
    var_cfg = bc.model_config(**bc.variants[0])
    assert var["flops_per_token"] == flops_per_token(var_cfg, 8) != base["flops_per_token"]
    assert var["tokens_per_s"] == pytest.approx(bc.batch_size * 8 / (var["step_ms"] / 1e3), rel=0.01)


@pytest.mark.slow
def test_compile_probe_cold_then_from_the_persistent_cache(tmp_path):
    bc = BenchConfig(model_overrides=TINY, n_layers=2, context_length=16, parts=("compile",), torch=False)
    rows = bench.bench_compile(bc, log=lambda s: None)
    assert [(r["variant"].startswith("attn=auto scan"), r["cache"]) for r in rows] == [
        (False, "cold"), (False, "persistent cache"), (True, "cold"), (True, "persistent cache")]
    for cold, warm in (rows[:2], rows[2:]):
        assert "error" not in cold and "error" not in warm
        assert warm["compile_s"] < cold["compile_s"]


@pytest.mark.slow
def test_cli_bench(tmp_path, capsys):
    from gptjax.cli import main

    assert main(["bench", "--n-layers", "1", "--emb-dim", "32", "--n-heads", "4", "--context-length", "16",
                 "--steps", "2", "--warmup", "1", "--decode-batch", "1", "--decode-tokens", "4", "--nocache-tokens",
                 "2", "--decode-rounds", "1", "--weight-dtype", "float32", "int8", "--parts", "train", "decode",
                 "--no-torch", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "### train" in out and "kv-cache int8-weights float32-compute" in out
    assert (tmp_path / "b.json").is_file()


def test_variant_flags_parse_to_typed_config_keys():
    from gptjax.cli import parse_variant

    assert parse_variant("scan_layers=true,scan_unroll=2,remat=dots") == {"scan_layers": True, "scan_unroll": 2,
                                                                          "remat": "dots"}
    assert parse_variant("scan_layers=false") == {"scan_layers": False}
    with pytest.raises(ValueError, match="expected KEY=VALUE pairs with GPTConfig keys"):
        parse_variant("layers=2")
    with pytest.raises(ValueError, match="scan_unroll takes a int, got 'two'"):
        parse_variant("scan_unroll=two")


def test_torch_process_must_be_known():
    with pytest.raises(ValueError, match="torch_process must be auto, same or apart, got 'elsewhere'"):
        BenchConfig(torch_process="elsewhere")
    with pytest.raises(ValueError, match=r"weight_dtypes must be float32, bfloat16 or int8, got \['int4'\]"):
        BenchConfig(weight_dtypes=("float32", "int4"))
    assert bench.torch_apart(BenchConfig(torch_process="apart")) and not bench.torch_apart(BenchConfig(torch_process="same"))
    assert bench.torch_apart(BenchConfig()) == (jax.default_backend() == "cpu")
