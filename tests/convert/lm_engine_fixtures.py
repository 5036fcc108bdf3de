"""The lm-engine fixtures (checkpoints and logits written by lm-engine's own code) and their inputs."""

import json
from pathlib import Path

import torch

FIXTURE_ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "lm_engine"
FIXTURES = {name: FIXTURE_ROOT / name for name in ("m2rnn-tiny", "hybrid-m2rnn-tiny")}


def fixture_config(fixture: Path) -> dict:
    return json.loads((fixture / "config.json").read_text())


def fixture_inputs(fixture: Path) -> torch.Tensor:
    return torch.tensor(json.loads((fixture / "inputs.json").read_text())["input_ids"])
