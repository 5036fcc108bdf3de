"""The state-tracking example (examples/state_tracking): the data generator's products, then the whole
pipeline for a few steps on tiny models (outputs written and well-formed; accuracy is not checked)."""

import json
import sys
from functools import reduce
from pathlib import Path

import pytest
import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "state_tracking"))
import run  # noqa: E402
from groups import PermutationGroup, compose  # noqa: E402
from models import MODELS, ModelSize, build_model  # noqa: E402


def test_compose_applies_the_right_permutation_first():
    a, b = (1, 0, 2), (0, 2, 1)                  # a swaps 0 and 1, b swaps 1 and 2
    assert compose(a, b) == (1, 2, 0)            # (a ∘ b)(1) = a(b(1)) = a(2) = 2
    assert compose(a, b) != compose(b, a)        # S3 is not abelian


@pytest.mark.parametrize("name, order", [("S3", 6), ("S5", 120), ("A5", 60)])
def test_group_elements_and_table(name, order):
    group = PermutationGroup(name)
    assert group.order == order and group.table.shape == (order, order)
    assert group.elements[0] == tuple(range(len(group.elements[0])))             # id 0 is the identity
    assert (group.table[0] == torch.arange(order)).all()
    for row in group.table:                                                       # a Latin square
        assert sorted(row.tolist()) == list(range(order))


@pytest.mark.parametrize("name", ["S3", "S5", "A5"])
def test_running_product_matches_composing_permutation_tuples(name):
    group = PermutationGroup(name)
    words, products = group.sample(4, 40, torch.Generator().manual_seed(0))
    assert words.shape == products.shape == (4, 40) and words.dtype == products.dtype == torch.int64
    for word, product in zip(words.tolist(), products.tolist()):
        perms = [group.elements[i] for i in word]
        for t in range(len(word)):
            # product_t = x_t ∘ x_{t-1} ∘ ... ∘ x_0: the newest element is applied last
            expected = reduce(lambda acc, x: compose(x, acc), perms[1 : t + 1], perms[0])
            assert group.elements[product[t]] == expected


@pytest.mark.parametrize("name", MODELS)
def test_every_model_labels_every_position(name):
    torch.manual_seed(0)
    model = build_model(name, 6, ModelSize(hidden_size=32, num_layers=2, num_heads=2, m2rnn_head_dim=4, max_length=16))
    assert model(torch.randint(6, (3, 11))).shape == (3, 11, 6)


def test_m2rnn_config_overrides_replace_the_recipe():
    size = ModelSize(hidden_size=32, num_layers=1, num_heads=2, m2rnn_head_dim=4, max_length=16)
    model = build_model("m2rnn", 6, size, {"m2rnn_v_head_dim": 8, "m2rnn_conv_kernel_size": 4})
    mixer = model.lm.model.layers[0].m2rnn
    assert mixer.value_head_dim == 8 and mixer.key_head_dim == 4 and mixer.conv_kernel_size == 4
    with pytest.raises(ValueError, match="m2rnn_v_head_dimm"):
        build_model("m2rnn", 6, size, {"m2rnn_v_head_dimm": 8})   # a typo would otherwise be kept and ignored
    with pytest.raises(SystemExit):
        run.parse_args(["--m2rnn-config", "[4]"])          # a JSON object of config fields, nothing else


def test_a_time_budget_ends_training_and_completes_the_curriculum():
    group = PermutationGroup("S3")
    args = run.parse_args(["--train-length", "16", "--batch-size", "2", "--max-seconds", "1", "--steps", "20000",
                           "--lr", "1e-3", "--device", "cpu"])
    args.seed = 0
    lengths = []
    original = group.sample
    group.sample = lambda batch, length, generator: lengths.append(length) or original(batch, length, generator)
    info = run.train(build_model("gru", group.order, ModelSize(hidden_size=8, num_layers=1)), group, args,
                     torch.device("cpu"))
    assert 0 < info["steps"] < 20_000 and info["steps"] == len(lengths) and info["train_seconds"] >= 1
    assert lengths[0] == 8 and lengths[-1] == 16                 # the curriculum ran to the full length
    curve = info["curve"]                                        # a point every run.CURVE_EVERY steps
    assert [point["step"] for point in curve] == list(range(0, info["steps"], run.CURVE_EVERY))
    assert curve[0]["length"] == 8 and all(point["loss"] > 0 for point in curve)


def test_exact_batch_rate_counts_the_later_full_length_batches():
    curve = [{"length": 8, "accuracy": 1.0}] + [{"length": 16, "accuracy": a} for a in (1.0, 0.5, 0.9999, 1.0, 1.0)]
    assert run.exact_batch_rate(curve, 16) == 2 / 3          # the later half: 0.9999, 1.0, 1.0
    assert run.exact_batch_rate(curve[:1], 16) is None       # training never reached the full length


def test_saved_weights_may_share_memory(tmp_path):
    # on CUDA, cuDNN packs a GRU's weights into one buffer; safetensors refuses tensors that share memory
    torch.manual_seed(0)
    model = build_model("gru", 6, ModelSize(hidden_size=8, num_layers=2))
    buffer = torch.cat([p.detach().flatten() for p in model.gru.parameters()])
    offset = 0
    for p in model.gru.parameters():
        p.data = buffer[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    run.save_weights(model, tmp_path / "gru.safetensors")
    fresh = build_model("gru", 6, ModelSize(hidden_size=8, num_layers=2))
    safetensors.torch.load_model(fresh, tmp_path / "gru.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_runs_are_spread_over_the_visible_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert run.visible_gpus("cuda") == ["3", "5"]
    assert run.visible_gpus("cuda:1") == [None] and run.visible_gpus("cpu") == [None]   # a named device stays


@pytest.fixture
def main_threads():
    """run.main uses one thread on the CPU; the other tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_pipeline_writes_table_plot_and_report(tmp_path, main_threads):
    # --jobs 2: the runs go to two processes at a time and are merged; two seeds of m2rnn become two rows
    argv = ["--group", "S3", "--steps", "4", "--train-length", "8", "--eval-lengths", "8", "16", "--batch-size", "4",
            "--eval-batch-size", "4", "--hidden-size", "16", "--num-layers", "2", "--num-heads", "2",
            "--m2rnn-seeds", "0", "1", "--jobs", "2", "--save-models", "--device", "cpu", "--output", str(tmp_path)]
    run.main(argv)
    results = json.loads((tmp_path / "results.json").read_text())
    rows = ["m2rnn seed 0", "m2rnn seed 1", *MODELS[1:]]
    assert list(results["groups"]["S3"]) == rows
    for model_run in results["groups"]["S3"].values():
        assert model_run["steps"] == 4
        assert set(model_run["eval"]) == {"8", "16"}
        assert all(0 <= score["accuracy"] <= 1 for score in model_run["eval"].values())
    runs = results["groups"]["S3"]
    assert runs["m2rnn seed 0"]["lr"] == run.LEARNING_RATES["m2rnn"] and runs["gru"]["lr"] == run.LEARNING_RATES["gru"]
    assert runs["m2rnn seed 0"]["final_train_loss"] != runs["m2rnn seed 1"]["final_train_loss"]   # two seeds, two runs
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    report = (tmp_path / "RESULTS.md").read_text()
    assert all(f"| {row} |" in report for row in rows)

    # a saved model, loaded into a fresh one, scores what its run reported
    args = run.parse_args(argv)
    size = ModelSize(hidden_size=16, num_layers=2, num_heads=2, max_length=16)
    model = build_model("m2rnn", 6, size, args.m2rnn_config)
    safetensors.torch.load_model(model, tmp_path / "runs" / "S3-m2rnn-seed1" / "models" / "S3-m2rnn-seed1.safetensors")
    scores = run.evaluate(model, PermutationGroup("S3"), args, torch.device("cpu"))
    assert {str(n): s for n, s in scores.items()} == runs["m2rnn seed 1"]["eval"]


def test_a_failed_run_stops_the_study_with_its_error(tmp_path, main_threads):
    argv = ["--models", "m2rnn", "gru", "--steps", "2", "--train-length", "8", "--eval-lengths", "8",
            "--batch-size", "2", "--hidden-size", "8", "--num-heads", "2", "--jobs", "2", "--device", "cpu",
            "--m2rnn-config", '{"m2rnn_v_head_dimm": 8}', "--output", str(tmp_path)]
    with pytest.raises(RuntimeError, match="not M2RNNConfig fields"):   # the child's error, in the parent's
        run.main(argv)
