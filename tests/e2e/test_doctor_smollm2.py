"""`llmprune doctor` on the real SmolLM2-135M: clean as shipped, one scaled tensor named."""

import pytest
from safetensors.torch import save_file

from tests.unit.test_doctor import _json


@pytest.mark.slow
def test_smollm2_passes_clean_with_forward_test():
    code, data = _json("smollm2-135m", "--test-forward")
    assert code == 0, data["findings"]
    assert data["findings"] == []
    assert data["num_parameters"] == 134_515_008
    layers = data["structure"]["layers"]
    assert len(layers) == 30 and {(layer["heads"], layer["kv_heads"], layer["mlp_width"]) for layer in layers} == {
        (9, 3, 1536)
    }
    assert data["structure"]["tied_embeddings"] is True
    assert data["forward"]["ok"] and data["forward"]["output_shape"][-1] == 49152


@pytest.mark.slow
def test_smollm2_with_one_tensor_scaled_is_flagged(tmp_path):
    from llmprune.engine.io.models import load_model

    model = load_model("smollm2-135m").model
    state = {name: tensor.clone() for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    state["model.layers.12.mlp.up_proj.weight"] *= 1e4
    path = tmp_path / "scaled.safetensors"
    save_file(state, str(path))
    code, data = _json(path, "--base-model", "smollm2-135m")
    assert code == 1
    assert [(f["check"], f["location"]) for f in data["findings"]] == [("huge", "model.layers.12.mlp.up_proj.weight")]
