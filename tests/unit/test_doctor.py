"""`llmprune doctor` on real broken checkpoints built from tiny random Llamas."""

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from llmprune.cli.app import app
from llmprune.engine.diagnose.doctor import DoctorConfig, run_doctor
from llmprune.engine.io.checkpoint import save_model
from tests.conftest import make_tiny_model

runner = CliRunner()

NAN_AT = "model.layers.1.self_attn.q_proj.weight"
INF_AT = "model.layers.2.mlp.down_proj.weight"
HUGE_AT = "model.layers.3.self_attn.o_proj.weight"


def _doctor(*args: str):
    return runner.invoke(app, ["doctor", *map(str, args)])


def _json(*args: str) -> tuple[int, dict]:
    result = _doctor(*args, "--json")
    return result.exit_code, json.loads(result.stdout)


def _assert_one_line_exit_2(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


@pytest.fixture()
def broken_file(tmp_path):
    """NaN in layer 1, Inf in layer 2, a tensor scaled x1e4 in layer 3."""
    state = {name: tensor.clone() for name, tensor in make_tiny_model().state_dict().items()}
    state[NAN_AT][5, 7] = float("nan")
    state[INF_AT][0, 0] = float("-inf")
    state[HUGE_AT] *= 1e4
    path = tmp_path / "broken.safetensors"
    save_file(state, str(path))
    return path


def test_healthy_tiny_directory_is_clean(tiny_model_dir):
    code, data = _json(tiny_model_dir, "--test-forward")
    assert code == 0 and data["ok"] and data["findings"] == []
    assert data["kind"] == "directory" and data["forward"]["ok"]
    assert data["structure"]["gqa_ratios"] == [4.0]
    assert data["num_parameters"] == sum(p.numel() for p in make_tiny_model().parameters())


def test_broken_file_names_each_planted_fault(broken_file, tiny_model_dir):
    code, data = _json(broken_file, "--base-model", tiny_model_dir)
    assert code == 1 and not data["ok"]
    located = {(f["check"], f["location"]) for f in data["findings"] if f["severity"] == "error"}
    assert located == {("nan", NAN_AT), ("inf", INF_AT), ("huge", HUGE_AT)}
    assert [layer["index"] for layer in data["layers"] if layer["findings"]] == [1, 2, 3]
    assert data["nan"] == 1 and data["inf"] == 1
    per_tensor = {t["name"]: t for t in data["tensors"]}
    assert per_tensor[NAN_AT]["nan"] == 1 and per_tensor[INF_AT]["inf"] == 1 and per_tensor[NAN_AT]["layer"] == 1
    assert per_tensor[HUGE_AT]["max_abs"] > 1000 * per_tensor["model.layers.0.self_attn.o_proj.weight"]["max_abs"]
    assert data["advice"]


def test_broken_file_without_config_is_still_diagnosed(broken_file):
    # no config.json and no --base-model: the tensors alone are enough for the weight checks
    code, data = _json(broken_file)
    assert code == 1
    assert {f["location"] for f in data["findings"] if f["severity"] == "error"} == {NAN_AT, INF_AT, HUGE_AT}
    assert data["structure"]["layers"][0]["heads"] is None  # head_dim unknown without a config
    assert data["structure"]["gqa_ratios"] == [4.0]


def test_rich_report_names_the_faults_and_the_fix(broken_file, tiny_model_dir):
    result = _doctor(broken_file, "--base-model", tiny_model_dir, "--test-forward")
    assert result.exit_code == 1
    for needle in (NAN_AT, INF_AT, HUGE_AT, "❌ NaN in 1 tensor(s) (1 values)", "What to do", "unsafe to train on"):
        assert needle in result.output.replace("\n", ""), needle


def test_forward_test_names_the_first_non_finite_module(tiny_model_dir, tmp_path):
    state = {name: tensor.clone() for name, tensor in make_tiny_model().state_dict().items()}
    state["model.layers.2.mlp.up_proj.weight"][3, :] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    code, data = _json(path, "--base-model", tiny_model_dir, "--test-forward")
    assert code == 1
    assert data["forward"]["first_nonfinite_module"] == "model.layers.2.mlp.up_proj"
    assert any(f["check"] == "forward" and f["location"] == "model.layers.2.mlp.up_proj" for f in data["findings"])


def test_gqa_breaking_shape_is_named(tiny_model_dir, tmp_path):
    state = {name: tensor.clone() for name, tensor in make_tiny_model().state_dict().items()}
    head_dim = 8
    state["model.layers.1.self_attn.q_proj.weight"] = state["model.layers.1.self_attn.q_proj.weight"][
        : 7 * head_dim
    ].clone()
    state["model.layers.1.self_attn.o_proj.weight"] = state["model.layers.1.self_attn.o_proj.weight"][
        :, : 7 * head_dim
    ].clone()
    path = tmp_path / "gqa.bin"
    torch.save(state, path)
    code, data = _json(path, "--base-model", tiny_model_dir)
    assert code == 1
    gqa = [f for f in data["findings"] if f["check"] == "gqa"]
    assert [f["location"] for f in gqa] == ["model.layers.1.self_attn"]
    assert "7 heads / 2 KV heads" in gqa[0]["message"]
    assert data["structure"]["layers"][1]["gqa_ok"] is False


def test_directory_whose_config_does_not_match_its_weights(tmp_path):
    model = make_tiny_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 256
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, data = _json(tmp_path)
    assert code == 1
    assert any(f["check"] == "shape" and "will not load" in f["message"] for f in data["findings"])


def test_mostly_zero_tensor_is_a_warning_and_exit_0(tiny_model_dir, tmp_path):
    state = {name: tensor.clone() for name, tensor in make_tiny_model().state_dict().items()}
    state["model.layers.0.mlp.gate_proj.weight"][:96] = 0
    path = tmp_path / "masked.safetensors"
    save_file(state, str(path))
    code, data = _json(path, "--base-model", tiny_model_dir)
    assert code == 0
    [zeros] = data["findings"]
    assert zeros["severity"] == "warning" and zeros["location"] == "model.layers.0.mlp.gate_proj.weight"


def _prune_one_kv_group(model, layer_index: int) -> None:
    """Remove KV group 1 (KV head 1 and its 4 query heads) from one layer, by hand."""
    attn = model.model.layers[layer_index].self_attn
    d = attn.head_dim
    keep_q, keep_kv = torch.arange(0, 4 * d), torch.arange(0, d)
    for linear, rows in ((attn.q_proj, keep_q), (attn.k_proj, keep_kv), (attn.v_proj, keep_kv)):
        linear.weight = torch.nn.Parameter(linear.weight[rows].clone())
        linear.out_features = len(rows)
    attn.o_proj.weight = torch.nn.Parameter(attn.o_proj.weight[:, keep_q].clone())
    attn.o_proj.in_features = len(keep_q)


@pytest.mark.parametrize("ppl_after,label,code", [(21.0, "healthy", 0), (60.0, "too high", 0), (200.0, "broken", 1)])
def test_pruned_directory_reports_gqa_and_verdict_relative_to_base(tmp_path, tiny_tokenizer, ppl_after, label, code):
    model = make_tiny_model()
    _prune_one_kv_group(model, 1)
    provenance = {
        "base_model": "tiny",
        "ppl_before": 20.0,
        "ppl_after": ppl_after,
        "dataset": "pydoc",
        "seq_len": 32,
        "max_windows": 4,
    }
    out = save_model(model, tiny_tokenizer, tmp_path / "pruned", provenance)
    code_seen, data = _json(out)
    assert code_seen == code
    assert data["kind"] == "llmprune"
    assert [layer["kv_heads"] for layer in data["structure"]["layers"]] == [2, 1, 2, 2]
    assert data["structure"]["gqa_ratios"] == [4.0]
    verdict = data["ppl"]["verdict"]
    assert data["ppl"]["source"] == "recorded by prune"
    assert verdict["scale"] == "relative" and verdict["label"] == label
    assert verdict["ratio"] == pytest.approx(ppl_after / 20.0)


def test_measured_ppl_with_base_ppl_and_without(tiny_model_dir, pydoc_text_file):
    args = [tiny_model_dir, "--ppl", "--dataset", pydoc_text_file, "--seq-len", "32", "--max-windows", "2"]
    code, data = _json(*args)
    assert data["ppl"]["source"] == "measured" and data["ppl"]["verdict"]["scale"] == "absolute"
    # a random tiny model is far worse than any real model: broken on the absolute scale
    assert data["ppl"]["verdict"]["label"] == "broken" and code == 1
    measured = data["ppl"]["ppl"]
    code, data = _json(*args, "--base-ppl", str(measured))
    assert code == 0 and data["ppl"]["verdict"] | {"label": "healthy", "scale": "relative"} == data["ppl"]["verdict"]
    assert data["ppl"]["verdict"]["ratio"] == pytest.approx(1.0)


def test_python_api_matches_the_command(broken_file, tiny_model_dir):
    report = run_doctor(DoctorConfig(model=str(broken_file), base_model=str(tiny_model_dir)))
    assert report.exit_code == 1
    assert {f.location for f in report.findings if f.severity == "error"} == {NAN_AT, INF_AT, HUGE_AT}


# ---------------------------------------------------------------- bad input: one line, exit 2


def test_truncated_safetensors(broken_file):
    data = broken_file.read_bytes()
    broken_file.write_bytes(data[: len(data) // 2])
    _assert_one_line_exit_2(_doctor(broken_file), "not a readable safetensors file")


def test_empty_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"")
    _assert_one_line_exit_2(_doctor(path), "is empty")


@pytest.mark.parametrize(
    "name,needle",
    [
        ("notes.txt", "not a model file"),
        ("model.safetensors", "not a readable safetensors"),
        ("model.bin", "not a readable PyTorch checkpoint"),
    ],
)
def test_text_file(tmp_path, name, needle):
    path = tmp_path / name
    path.write_text("these are not weights\n" * 20)
    _assert_one_line_exit_2(_doctor(path), needle)


def test_pickle_needs_trust_pickle(tmp_path, tiny_model_dir):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"model": make_tiny_model(), "tokenizer": None}, path)
    _assert_one_line_exit_2(_doctor(path), "--trust-pickle")
    code, data = _json(path, "--trust-pickle", "--base-model", tiny_model_dir)
    assert code == 0 and data["ok"]


def test_state_dict_that_does_not_fit_base_model(tmp_path, tiny_model_dir):
    path = tmp_path / "other.safetensors"
    save_file(make_tiny_model(hidden=96, heads=12, kv_heads=4).state_dict(), str(path))
    _assert_one_line_exit_2(_doctor(path, "--base-model", tiny_model_dir), "does not fit")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--seq-len", "1", "--ppl"], "--seq-len"),
        (["--base-ppl", "0"], "--base-ppl"),
        (["--max-windows", "0"], "--max-windows"),
    ],
)
def test_bad_options(tiny_model_dir, args, needle):
    _assert_one_line_exit_2(_doctor(tiny_model_dir, *args), needle)


def test_missing_path():
    _assert_one_line_exit_2(_doctor("/no/such/model.safetensors"), "does not exist")


def test_tied_state_dict_counts_the_embedding_once(tmp_path, tiny_tokenizer):
    model = make_tiny_model(tie_word_embeddings=True)
    base = tmp_path / "base"
    model.save_pretrained(base)
    path = tmp_path / "tied.bin"
    torch.save(model.state_dict(), path)  # lm_head.weight and embed_tokens.weight share one storage
    code, data = _json(path, "--base-model", base)
    assert code == 0, data["findings"]
    assert data["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert data["structure"]["tied_embeddings"] is True


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    _assert_one_line_exit_2(_doctor(tmp_path), "holds no weights")


def test_folder_with_a_truncated_shard(tmp_path):
    make_tiny_model().save_pretrained(tmp_path)
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:5000])
    _assert_one_line_exit_2(_doctor(tmp_path), "not a readable safetensors file")


def test_gguf_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("not a gguf file at all\n")
    _assert_one_line_exit_2(_doctor(path), "cannot read GGUF file")
