"""Tensor parallelism by heads (modeling_m2rnn/distributed/tensor_parallel.py): two processes on gloo against one,
and the degrees that cannot split the heads."""

import json

import pytest
from transformers.distributed.tensor_parallel import ParallelInterface

from modeling_m2rnn.distributed import M2RNN_STYLE, check_tensor_parallel_degree
from modeling_m2rnn.distributed.tensor_parallel import m2rnn_layout

from helpers import REPO_ROOT, run_on_two_gloo_ranks, tiny_config, tiny_model


def test_two_ranks_on_gloo_give_the_logits_gradients_tokens_and_checkpoint_of_one_process(tmp_path):
    """benchmarks/check_tensor_parallel.py under torchrun, 2 processes: for a pure M2RNN model, a hybrid with
    attention and one of Gated DeltaNet, M2RNN and attention layers with MoE MLPs, every layer split, logits
    (also of packed rows), loss, gradient norm and every gradient within 1e-5 of one process (float32; seen
    <= 3.2e-6, on dt_bias, whose float32 gradient is 3.1e-6 off its float64 value in one process too), the same
    greedy tokens from a left-padded batch (dynamic and static cache), and the checkpoint the split model saves
    equal bit for bit to the one it loaded."""
    run_on_two_gloo_ranks(REPO_ROOT / "benchmarks" / "check_tensor_parallel.py", "--output-dir", str(tmp_path))
    report = json.loads((tmp_path / "check_tensor_parallel.json").read_text())
    assert report["passed"] and report["world_size"] == 2
    assert set(report["families"]) == {"m2rnn", "hybrid", "hybrid_gdn_moe"}


class _Mesh:
    """What a tensor-parallel style asks of its device mesh, for `size` ranks, without a process group."""

    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size

    def get_local_rank(self) -> int:
        return 0

    def get_group(self):
        return None


@pytest.mark.parametrize(
    ("overrides", "tp_size", "field"),
    [
        ({}, 3, "N = the largest M2RNN head count"),
        ({"m2rnn_num_v_heads": 8, "m2rnn_num_f_heads": 8, "m2rnn_num_g_heads": 2}, 4, "m2rnn_num_g_heads"),
        ({"m2rnn_num_q_heads": 2}, 4, "m2rnn_num_q_heads"),
    ],
)
def test_an_m2rnn_layer_refuses_a_degree_that_does_not_split_its_heads(overrides, tp_size, field):
    """A head count must be divisible by the degree, or be 1 (one head shared by all, held whole by every rank);
    N itself must always be divisible."""
    config = tiny_config("pure", **overrides)
    with pytest.raises(ValueError, match=f"`{field}`"):
        check_tensor_parallel_degree(config, tp_size)
    mixer = tiny_model("pure", **overrides).model.layers[0].m2rnn
    with pytest.raises(ValueError, match=f"`{field}`"):
        ParallelInterface()[M2RNN_STYLE].install_forward(mixer, _Mesh(tp_size))


@pytest.mark.parametrize(
    ("overrides", "tp_size", "message"),
    [
        ({"gdn_num_heads": 6, "gdn_num_k_heads": 3}, 2, "`gdn_num_k_heads` = 3"),
        ({"gdn_num_heads": 3, "gdn_num_k_heads": 1}, 2, "`gdn_num_heads` = 3"),
        ({"mlp_layer_types": ["sparse"] * 3, "moe_intermediate_size": 6}, 4, "`moe_intermediate_size` = 6"),
        ({"mlp_layer_types": ["sparse"] * 3, "shared_expert_intermediate_size": 6}, 4,
         "`shared_expert_intermediate_size` = 6"),
    ],
)
def test_a_degree_that_does_not_split_gated_deltanet_heads_or_expert_widths_is_refused(overrides, tp_size, message):
    config = tiny_config("pure", **{"layer_types": ["gated_deltanet", "m2rnn", "m2rnn"], "m2rnn_num_v_heads": 4,
                                    "m2rnn_num_f_heads": 4, "m2rnn_num_g_heads": 4, "m2rnn_num_weight_heads": 4,
                                    "gdn_num_heads": 4, "gdn_num_k_heads": 1, "gdn_key_head_dim": 6,
                                    "gdn_value_head_dim": 5, "num_experts": 4, "num_experts_per_tok": 2,
                                    "moe_intermediate_size": 8, "shared_expert_intermediate_size": 8, **overrides})
    with pytest.raises(ValueError, match=message):
        check_tensor_parallel_degree(config, tp_size)


def test_a_degree_that_does_not_split_the_attention_heads_is_refused():
    config = tiny_config("hybrid", num_attention_heads=6, num_key_value_heads=3, m2rnn_num_v_heads=6,
                         m2rnn_num_f_heads=6, m2rnn_num_g_heads=6, m2rnn_num_weight_heads=6)
    check_tensor_parallel_degree(config, 3)
    with pytest.raises(ValueError, match="`num_key_value_heads` = 3"):
        check_tensor_parallel_degree(config, 2)


def test_each_block_of_the_fused_projection_is_split_by_its_own_head_count():
    """in_proj rows q | k | v | f | g with Nq = Nk = 1, Nv = Nf = 4, Ng = 2 over 2 ranks: q and k whole on both,
    each rank half of v, f and g; the ranks' rows of the split blocks tile them."""
    mixer = tiny_model("pure").model.layers[0].m2rnn
    split = m2rnn_layout(mixer)["in_proj.weight"]
    K, V = mixer.key_head_dim, mixer.value_head_dim
    widths = [K, K, 4 * V, 4, 2 * V]
    starts = [sum(widths[:i]) for i in range(5)]
    for rank in range(2):
        ranges = split.local_ranges(rank, 2)
        assert ranges[:2] == [(0, K), (K, 2 * K)]
        assert ranges[2:] == [(start + rank * width // 2, start + (rank + 1) * width // 2)
                              for start, width in zip(starts[2:], widths[2:])]
    assert split.whole_ranges(2) == [(0, 2 * K)]
    assert sum(block.local_width(2) for block in split.blocks) == 2 * K + (6 * V + 4) // 2
