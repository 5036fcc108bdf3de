"""lm-evaluation-harness on a tiny model: every request type it sends, scored by the harness and by us.

The tasks are defined here (a YAML file and JSON lines per task in tmp_path), so nothing is downloaded.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from helpers import random_ids, tiny_model

# One token per character; "_" pads (the harness right-pads with id 0 too) and "|" ends a text.
ALPHABET = "_|? abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXY"
EOS = "|"

CHOICE_DOCS = [   # contexts and choices of unequal lengths, so the harness's batches are right-padded
    {"question": "the cat sat on", "choices": ["the mat", "a dog", "it"], "answer": 0},
    {"question": "two plus two is", "choices": ["four", "five and a half"], "answer": 0},
    {"question": "sky", "choices": ["blue", "green", "red", "grey today"], "answer": 1},
]
ROLLING_DOCS = [
    {"text": "m2rnn keeps a matrix state per head and has no context limit"},
    {"text": "short doc"},
    {"text": "abcdefghijklmnopqrstuvwxyz0123456789" * 2},
]
GENERATE_DOCS = [
    {"prompt": "hello w", "target": "orld"},
    {"prompt": "abc", "target": "d"},
    {"prompt": "q", "target": "r"},
]
MAX_GEN_TOKS = 12

TASKS = {
    "m2rnn_choice": (CHOICE_DOCS, {
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc"}],
    }),
    "m2rnn_rolling": (ROLLING_DOCS, {
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}],
    }),
    "m2rnn_generate": (GENERATE_DOCS, {
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{target}}",
        "generation_kwargs": {"do_sample": False, "max_gen_toks": MAX_GEN_TOKS},   # "until": see write_tasks
        "metric_list": [{"metric": "exact_match"}],
    }),
}


def eval_tokenizer() -> PreTrainedTokenizerFast:
    """A character tokenizer made in code (nothing to download), with padding and an end-of-text token."""
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(ALPHABET)}, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="_", unk_token="?", eos_token=EOS)


def eval_model():
    return tiny_model("hybrid", vocab_size=len(ALPHABET), eos_token_id=ALPHABET.index(EOS))


def stop_strings(model, tokenizer) -> list[str]:
    """generate_until's stop strings: the fourth character of each prompt's greedy continuation, so that every
    generation meets one well before max_gen_toks, whatever the tiny model's random weights generate."""
    return sorted({greedy_until(model, tokenizer, doc["prompt"], stops=[])[3] for doc in GENERATE_DOCS})


def write_tasks(directory, stops: list[str]) -> TaskManager:
    """Each task as a YAML file over a JSON lines file, both in `directory`; `stops` ends a generation."""
    for name, (docs, fields) in TASKS.items():
        if fields["output_type"] == "generate_until":
            fields = {**fields, "generation_kwargs": {**fields["generation_kwargs"], "until": stops}}
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in docs), encoding="utf-8")
        config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
                  "test_split": "test", **fields}
        # JSON is YAML: the harness reads this file with its YAML loader
        (directory / f"{name}.yaml").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return TaskManager(include_path=str(directory), include_defaults=False)   # indexing the built-in tasks takes ~10 s


def run_harness(model, task_manager, **model_args) -> dict:
    """The harness's responses per task and document: (log-likelihood, is_greedy) per choice, the document's
    log-likelihood, or the generated text."""
    results = simple_evaluate(model=model, model_args=model_args or None, tasks=list(TASKS), batch_size=2,
                              task_manager=task_manager, log_samples=True, bootstrap_iters=0)
    samples = {}
    for name, task_samples in results["samples"].items():
        by_doc = sorted(task_samples, key=lambda sample: sample["doc_id"])
        samples[name] = [[response[0] for response in sample["resps"]] for sample in by_doc]
    return samples


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) from one unpadded forward, in float64."""
    logits = model(torch.tensor([context + continuation])).logits[0].double()    # (S, V)
    logprobs = F.log_softmax(logits[len(context) - 1 : -1], dim=-1)              # (len(continuation), V)
    return logprobs.gather(1, torch.tensor(continuation)[:, None]).sum().item()


def rolling_loglikelihood(model, tokens: list[int], prefix: int, window: int) -> float:
    """A document's log-likelihood scored in chunks of `window` tokens: the first chunk after `prefix`, each later
    chunk after the last token of the one before (the harness's rolling windows when the document's length is a
    multiple of `window`; a window at least as long as the document scores it in one pass)."""
    total = loglikelihood(model, [prefix], tokens[:window])
    for start in range(window, len(tokens), window):
        total += loglikelihood(model, tokens[start - 1 : start], tokens[start : start + window])
    return total


@torch.no_grad()
def greedy_until(model, tokenizer, prompt: str, stops: list[str]) -> str:
    """Greedy generation of one unpadded prompt, cut before the first stop string."""
    ids = torch.tensor([ids_of(tokenizer, prompt)])
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_GEN_TOKS,
                               do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1] :]
    text = tokenizer.decode(generated, skip_special_tokens=True)
    return min((text.split(stop)[0] for stop in stops), key=len, default=text)


def expected_scores(model, tokenizer, stops: list[str]) -> dict:
    """What the harness should report, computed directly with the model, one unpadded sequence at a time."""
    choices = [[loglikelihood(model, ids_of(tokenizer, doc["question"]), ids_of(tokenizer, " " + choice))
                for choice in doc["choices"]] for doc in CHOICE_DOCS]
    rolling = [loglikelihood(model, [tokenizer.eos_token_id], ids_of(tokenizer, doc["text"])) for doc in ROLLING_DOCS]
    generated = [greedy_until(model, tokenizer, doc["prompt"], stops) for doc in GENERATE_DOCS]
    return {"m2rnn_choice": choices, "m2rnn_rolling": rolling, "m2rnn_generate": generated}


def assert_scores_match(samples: dict, expected: dict):
    harness_choices = [ll for doc in samples["m2rnn_choice"] for ll, _ in doc]
    ours = [ll for doc in expected["m2rnn_choice"] for ll in doc]
    assert max(abs(theirs - mine) for theirs, mine in zip(harness_choices, ours, strict=True)) < 1e-4
    harness_rolling = [doc[0] for doc in samples["m2rnn_rolling"]]
    ours = expected["m2rnn_rolling"]
    assert max(abs(theirs - mine) for theirs, mine in zip(harness_rolling, ours, strict=True)) < 1e-4
    assert [doc[0] for doc in samples["m2rnn_generate"]] == expected["m2rnn_generate"]


@pytest.mark.parametrize("kind", ["pure", "hybrid"])
def test_right_padding_without_a_mask_leaves_every_real_position_unchanged(kind):
    # The harness scores a batch of loglikelihood requests as one (B, S) input, right-padded with id 0 and given
    # to the model without an attention mask: the padding comes after every scored token, so a causal model
    # (the recurrence and the short convolution included) must give the unpadded logits at the real positions.
    model = tiny_model(kind)
    lengths = [11, 4, 7]
    rows = [random_ids(1, n, seed=n)[0] for n in lengths]
    padded = torch.zeros(len(rows), max(lengths), dtype=torch.long)   # (B, S)
    for row, ids in zip(padded, rows):
        row[: len(ids)] = ids
    with torch.no_grad():
        batched = model(padded).logits
        for logits, ids in zip(batched, rows):
            alone = model(ids[None]).logits[0]
            assert (logits[: len(ids)] - alone).abs().max() <= 1e-5 * alone.abs().max()


def test_the_harness_scores_a_model_in_memory_like_our_own_computation(tmp_path):
    model, tokenizer = eval_model(), eval_tokenizer()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    # a model type unknown to transformers' tables is taken as causal, which it is
    assert lm.backend == "causal"
    # the harness's context length is the config's max_position_embeddings unless max_length says otherwise
    assert lm.max_length == model.config.max_position_embeddings

    stops = stop_strings(model, tokenizer)
    samples = run_harness(lm, write_tasks(tmp_path, stops))

    expected = expected_scores(model, tokenizer, stops)
    assert_scores_match(samples, expected)
    assert all(len(text) <= 3 for text in expected["m2rnn_generate"])   # a stop string ended each one


def test_rolling_loglikelihood_uses_windows_of_max_length():
    # An RNN has no context limit, but the harness cuts a document into windows of max_length tokens; the
    # 72-character document is scored as 6 windows of 12.
    model, tokenizer = eval_model(), eval_tokenizer()
    text = ROLLING_DOCS[2]["text"]
    assert len(ids_of(tokenizer, text)) == 72
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", max_length=12, batch_size=2)
    assert lm.max_length == 12
    request = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (score,) = lm.loglikelihood_rolling([request])
    windowed = rolling_loglikelihood(model, ids_of(tokenizer, text), tokenizer.eos_token_id, window=12)
    whole = rolling_loglikelihood(model, ids_of(tokenizer, text), tokenizer.eos_token_id, window=72)
    assert abs(score - windowed) < 1e-4
    assert abs(windowed - whole) > 1e-2   # the windows do lose context


def test_lm_eval_loads_a_saved_checkpoint_with_trust_remote_code(tmp_path):
    model, tokenizer = eval_model(), eval_tokenizer()
    model.save_pretrained(tmp_path / "checkpoint")
    tokenizer.save_pretrained(tmp_path / "checkpoint")

    # what `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --device cpu` runs
    stops = stop_strings(model, tokenizer)
    samples = run_harness("hf", write_tasks(tmp_path, stops), pretrained=str(tmp_path / "checkpoint"),
                          trust_remote_code=True, device="cpu")

    assert_scores_match(samples, expected_scores(model, tokenizer, stops))

