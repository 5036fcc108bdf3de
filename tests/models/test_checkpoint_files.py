"""The files save_pretrained writes beside the weights: names that cannot be a user's, nothing of the user's
overwritten, and an upload to the Hub that holds everything `from_pretrained(trust_remote_code=True)` needs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from modeling_m2rnn.remote_code import MARKER

from helpers import random_ids, tiny_model

USER_FILES = ("models.py", "layers.py", "configuration.py", "kernels.py", "remote_code.py", "models_m2rnn.py")


def code_files(directory) -> list[str]:
    return sorted(path.name for path in directory.glob("*.py"))


def test_the_code_files_have_names_no_user_file_has_and_start_with_the_marker(tmp_path):
    tiny_model("pure").save_pretrained(tmp_path)
    names = code_files(tmp_path)
    assert "configuration_m2rnn.py" in names and "modeling_m2rnn.py" in names
    assert "modeling_m2rnn_kernels_m2rnn_scan_naive.py" in names
    assert all(name in ("configuration_m2rnn.py", "modeling_m2rnn.py") or name.startswith("modeling_m2rnn_")
               for name in names)
    for name in names:
        assert (tmp_path / name).read_text().splitlines()[0] == MARKER, name
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_m2rnn.M2RNNConfig"
    assert {auto_map[k] for k in ("AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification")} == {
        "modeling_m2rnn.M2RNNModel", "modeling_m2rnn.M2RNNForCausalLM", "modeling_m2rnn.M2RNNForSequenceClassification"
    }


def test_the_users_files_beside_a_checkpoint_are_left_as_they_were(tmp_path):
    for name in USER_FILES:
        (tmp_path / name).write_text(f"# the user's own {name}\n")
    model = tiny_model("hybrid")
    model.save_pretrained(tmp_path)
    for name in USER_FILES:
        assert (tmp_path / name).read_text() == f"# the user's own {name}\n"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_ids(1, 6)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("taken_name", ["modeling_m2rnn.py", "configuration_m2rnn.py", "modeling_m2rnn_kernels.py"])
def test_a_file_of_a_code_name_we_did_not_write_stops_the_save_before_anything_is_written(taken_name, tmp_path):
    (tmp_path / taken_name).write_text("# mine\n")
    with pytest.raises(ValueError, match=taken_name):
        tiny_model("pure").save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [taken_name]   # no weights, no config, no code
    assert (tmp_path / taken_name).read_text() == "# mine\n"


def test_saving_again_into_a_checkpoint_rewrites_its_code(tmp_path):
    tiny_model("pure").save_pretrained(tmp_path)
    (tmp_path / "modeling_m2rnn_kernels.py").write_text(f"{MARKER}\n# stale\n")
    tiny_model("pure").save_pretrained(tmp_path)
    assert "# stale" not in (tmp_path / "modeling_m2rnn_kernels.py").read_text()


def test_a_checkpoint_saved_with_the_former_flat_names_is_saved_over(tmp_path):
    """Earlier versions wrote `configuration_m2rnn.py` (no marker) and `models_m2rnn.py`, named by the auto_map."""
    model = tiny_model("pure")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_m2rnn.M2RNNConfig",
                          "AutoModelForCausalLM": "models_m2rnn.M2RNNForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "configuration_m2rnn.py").write_text('"""M2RNNConfig of an earlier version."""\n')
    model.save_pretrained(tmp_path)
    assert (tmp_path / "configuration_m2rnn.py").read_text().startswith(MARKER)


class RecordingHub:
    """Stands in for the Hub: records each commit's files with their contents at upload time."""

    def __init__(self):
        self.commits = []

    def create_repo(self, repo_id, **kwargs):
        return type("RepoUrl", (), {"repo_id": f"user/{repo_id}"})()

    def create_commit(self, repo_id, operations, **kwargs):
        self.commits.append({op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations})


def test_push_to_hub_uploads_the_code_and_the_auto_map(tmp_path, monkeypatch):
    hub = RecordingHub()
    card = ModelCard("---\nlibrary_name: transformers\n---\nA test card.")
    for module in (transformers.utils.hub, transformers.modeling_utils):
        monkeypatch.setattr(module, "hf_api", lambda: hub)
        monkeypatch.setattr(module, "create_and_tag_model_card", lambda *args, **kwargs: card)
    (tmp_path / "notes.txt").write_text("the user's, not part of the model")
    tiny_model("pure").save_pretrained(tmp_path, push_to_hub=True, commit_message="first")

    (uploaded,) = hub.commits
    assert set(code_files(tmp_path)) <= set(uploaded)
    assert {"model.safetensors", "config.json", "README.md"} <= set(uploaded)
    assert "notes.txt" not in uploaded   # as transformers does: only what this save wrote
    assert json.loads(uploaded["config.json"])["auto_map"]["AutoModelForCausalLM"] == "modeling_m2rnn.M2RNNForCausalLM"


RESAVE_SCRIPT = """
import sys, torch
sys.modules["modeling_m2rnn"] = None   # the package must not be importable: only the checkpoint's code may run
from transformers import AutoModelForCausalLM
first = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
first.save_pretrained(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], trust_remote_code=True).eval()
with torch.no_grad():
    torch.save(model(torch.tensor([[3, 1, 4, 1, 5]])).logits, sys.argv[3])
"""


def test_a_model_loaded_from_its_checkpoints_code_saves_the_same_files_again(tmp_path):
    model = tiny_model("hybrid")
    model.save_pretrained(tmp_path / "first")
    result = subprocess.run(
        [sys.executable, "-c", RESAVE_SCRIPT, str(tmp_path / "first"), str(tmp_path / "second"),
         str(tmp_path / "logits.pt")],
        check=False, capture_output=True, text=True, cwd=tmp_path, env={"HF_MODULES_CACHE": str(tmp_path / "modules"),
                                                           "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # (the modules cache holds what the model imports: the converter, say, stays behind)
    resaved = set(code_files(tmp_path / "second"))
    assert {"configuration_m2rnn.py", "modeling_m2rnn.py"} <= resaved <= set(code_files(tmp_path / "first"))
    with torch.no_grad():
        expected = model(torch.tensor([[3, 1, 4, 1, 5]])).logits
    reloaded = torch.load(tmp_path / "logits.pt")
    assert ((reloaded - expected).norm() / expected.norm()) < 1e-6   # (another process: other thread counts)
