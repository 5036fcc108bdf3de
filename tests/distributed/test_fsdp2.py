"""FSDP2 (`fully_shard` by decoder layer) on a model of every layer kind with MoE MLPs: two processes on gloo
against one."""

import json

from helpers import REPO_ROOT, run_on_two_gloo_ranks


def test_two_sharded_ranks_train_like_one_process_with_and_without_gradient_checkpointing(tmp_path):
    """benchmarks/check_fsdp2.py: Gated DeltaNet, M2RNN and attention layers with MoE MLPs (router aux loss on),
    every parameter sharded; the loss, every gradient, the parameters after an AdamW step and the next loss within
    1e-5 of one process (float32; seen <= 1.6e-7)."""
    run_on_two_gloo_ranks(REPO_ROOT / "benchmarks" / "check_fsdp2.py", "--output-dir", str(tmp_path))
    report = json.loads((tmp_path / "check_fsdp2.json").read_text())
    assert report["passed"] and report["world_size"] == 2
    assert set(report["cases"]) == {"plain", "gradient_checkpointing"}
    for case in report["cases"].values():
        assert case["unsharded_parameters"] == [] and case["gradients"] <= 1e-5
