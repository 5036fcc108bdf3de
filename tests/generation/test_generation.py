"""Generation beyond the basics: static cache and compiled decode, reusable prompt states, streaming, stop
strings and the text-generation pipeline."""

import threading

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from torch._dynamo.utils import counters
from transformers import CompileConfig, PreTrainedTokenizerFast, TextIteratorStreamer, pipeline
from transformers.masking_utils import create_masks_for_generate

from modeling_m2rnn import M2RNNCache, M2RNNStaticCache, load_prompt_state, save_prompt_state
from modeling_m2rnn.generation.decode_graphs import DecodeGraphs, graph_free_compile_kwargs
from modeling_m2rnn.generation.mixin import _static_decode_masks

from helpers import cache_after, left_pad, random_ids, tiny_model

KINDS = ["pure", "hybrid"]
ALPHABET = "_?abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVW"   # as many as the tiny model's vocabulary
PROMPT = "bmnh"   # ids 3, 14, 15, 9


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character tokenizer made in code (nothing to download), one id per character of ALPHABET, 0 is padding."""
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(ALPHABET)}, unk_token="?"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="_", unk_token="?")


@pytest.mark.parametrize("kind", KINDS)
def test_static_cache_gives_the_eager_tokens(kind):
    model = tiny_model(kind)
    prompt = random_ids(2, 6)
    dynamic = model.generate(prompt, max_new_tokens=8, min_new_tokens=8)
    static = model.generate(prompt, max_new_tokens=8, min_new_tokens=8, cache_implementation="static")
    beams = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, min_new_tokens=6)
    assert torch.equal(dynamic, static)
    assert torch.equal(model.generate(prompt, **beams), model.generate(prompt, cache_implementation="static", **beams))


@pytest.mark.parametrize("kind", KINDS)
def test_static_cache_with_a_left_padded_batch(kind):
    model = tiny_model(kind)
    prompts = [random_ids(n, seed=n) for n in (3, 8)]
    ids, mask = left_pad(prompts)
    static = model.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, cache_implementation="static")
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens=5, min_new_tokens=5)
        assert torch.equal(static[row, -5:], alone[0, -5:])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padded", [True, False], ids=["left_padded", "no_mask"])
def test_decode_step_masks_are_transformers_masks(kind, padded):
    """The model builds generate's decode-step masks itself (host time); they must be the ones transformers builds,
    from a left-padding mask or, as newer generate passes for unpadded prompts, from none."""
    model = tiny_model(kind)
    ids, mask = left_pad([random_ids(n, seed=n) for n in (3, 8)])
    cache = M2RNNStaticCache(model.config, max_cache_len=13)
    model(ids, attention_mask=mask if padded else None, past_key_values=cache)
    for _step in range(2):   # the first decode step, and one more after it
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        step_mask = mask if padded else None
        step_embeds = torch.empty(2, 1, 0)
        position_ids = mask.sum(1, keepdim=True) - 1 if padded else torch.full((2, 1), mask.shape[1] - 1)
        ours = model.create_masks_for_generate(model.config, step_embeds, step_mask, cache, position_ids=position_ids)
        general = create_masks_for_generate(model.config, step_embeds, step_mask, cache, position_ids=position_ids)
        assert _static_decode_masks(model.config, step_embeds, step_mask, cache) is not None   # built here
        assert ours.keys() == general.keys()
        for layer_type, general_mask in general.items():
            assert (ours[layer_type] is None and general_mask is None) or torch.equal(ours[layer_type], general_mask)
        model(ids[:, -1:], attention_mask=step_mask, past_key_values=cache)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 2])   # one row: the projections become reductions (layers/linear.py)
def test_compiled_decode_equals_eager_in_one_graph_without_recompiles(kind, batch):
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(kind)
    prompt = random_ids(batch, 6, seed=5)
    eager = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, cache_implementation="static")
    compile_config = compile_on_any_device(fullgraph=True, dynamic=False)
    compiled = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, cache_implementation="static",
                              compile_config=compile_config)
    assert torch.equal(eager, compiled)
    assert counters["stats"]["unique_graphs"] == 1   # the decode step, traced once with fullgraph=True
    try:
        torch._dynamo.config.error_on_recompile = True
        again = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, cache_implementation="static",
                               compile_config=compile_config)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert torch.equal(again, eager)


class EmulatedGraphs:
    """CUDAGraphCapture's behaviour on the CPU: a capture changes no tensor (a CUDA graph records kernels without
    running them) and a replay runs the step again on the captured inputs, writing over the captured outputs."""

    def __init__(self):
        self.captures = self.replays = 0

    def __call__(self, step, kwargs):
        self.captures += 1
        cache = next(value for value in kwargs.values() if isinstance(value, M2RNNStaticCache))   # under either name
        before = [t.clone() for t in cache.tensors()]
        outputs = step(**kwargs)
        for tensor, saved in zip(cache.tensors(), before):
            tensor.copy_(saved)

        def replay():
            self.replays += 1
            for name, value in step(**kwargs).items():
                if isinstance(value, torch.Tensor):
                    outputs[name].copy_(value)

        return replay, outputs


def emulated_decode_graphs(model) -> tuple[DecodeGraphs, EmulatedGraphs]:
    """DecodeGraphs over an emulated capture, on dynamo without inductor (a quick compile)."""
    capture = EmulatedGraphs()
    return DecodeGraphs(model, dict(backend="eager", fullgraph=True, dynamic=False), capture=capture), capture


def compile_on_any_device(**options) -> CompileConfig:
    compile_config = CompileConfig(**options)
    compile_config._compile_all_devices = True   # generate compiles only on accelerators unless told to
    return compile_config


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 2])   # 2: left-padded, so the attention layers' masks change every step
def test_decode_graphs_replay_the_eager_steps(kind, batch, monkeypatch):
    torch._dynamo.reset()
    model = tiny_model(kind)
    ids, mask = left_pad([random_ids(n, seed=n) for n in (5, 3)[:batch]])
    run = dict(attention_mask=mask, max_new_tokens=7, min_new_tokens=7, return_dict_in_generate=True,
               output_logits=True)
    eager = model.generate(ids, past_key_values=M2RNNStaticCache(model.config, max_cache_len=16), **run)
    graphs, capture = emulated_decode_graphs(model)
    steps = []   # the arguments of each decode step
    def recording_graphs(**step):
        steps.append(step)
        return graphs(**step)

    monkeypatch.setattr(model, "get_compiled_call", lambda compile_config: recording_graphs)
    compile_config = compile_on_any_device()
    for _ in range(2):   # the second generate has a new cache: new addresses, a new graph
        cache = M2RNNStaticCache(model.config, max_cache_len=16)   # room for the two steps after generate
        replayed = model.generate(ids, past_key_values=cache, compile_config=compile_config, **run)
        assert torch.equal(replayed.sequences, eager.sequences)
        # each step's logits are its own (a replay overwrites the graph's outputs); float32, and at one row the
        # compiled projections sum in another order (layers/linear.py): seen ~1e-7
        replayed_logits, eager_logits = torch.stack(replayed.logits), torch.stack(eager.logits)
        assert (replayed_logits - eager_logits).norm() / eager_logits.norm() < 1e-5
    # per generate (a new cache): the prefill, a decode step warming up, then one capture and 5 replays
    assert (capture.captures, capture.replays) == (2, 10)
    with torch.no_grad():   # as in generate
        logits = graphs(**steps[-1]).logits
        saved = logits.clone()
        graphs(**steps[-1])   # one more step, from another state: its logits must go elsewhere
    assert torch.equal(logits, saved)


def test_decode_graphs_run_steps_with_more_than_tensor_outputs_uncaptured(monkeypatch):
    """Hidden states come out as a tuple per step, which a replay could not hand out fresh: no graph is captured."""
    torch._dynamo.reset()
    model = tiny_model("hybrid")
    run = dict(max_new_tokens=4, min_new_tokens=4, return_dict_in_generate=True, output_hidden_states=True)
    eager = model.generate(random_ids(1, 5), past_key_values=M2RNNStaticCache(model.config, max_cache_len=9), **run)
    graphs, capture = emulated_decode_graphs(model)
    monkeypatch.setattr(model, "get_compiled_call", lambda compile_config: graphs)
    compiled = model.generate(random_ids(1, 5), past_key_values=M2RNNStaticCache(model.config, max_cache_len=9),
                              compile_config=compile_on_any_device(), **run)
    assert capture.captures == 0
    assert torch.equal(compiled.sequences, eager.sequences)
    compiled_last, eager_last = (torch.stack(output.hidden_states[-1]) for output in (compiled, eager))
    assert (compiled_last - eager_last).norm() / eager_last.norm() < 1e-5


def test_decode_graphs_take_the_cuda_graphs_out_of_the_compile_config():
    assert graph_free_compile_kwargs(CompileConfig()) == dict(
        fullgraph=False, dynamic=None, backend="inductor", options={"triton.cudagraphs": False}
    )
    autotune = graph_free_compile_kwargs(CompileConfig(mode="max-autotune"))["options"]
    assert autotune == {"max_autotune": True, "coordinate_descent_tuning": True, "triton.cudagraphs": False}
    guard_filter = torch.compiler.keep_tensor_guards_unsafe
    options = dict(torch._inductor.list_mode_options("reduce-overhead"), guard_filter_fn=guard_filter)
    assert graph_free_compile_kwargs(CompileConfig(mode=None, options=options))["options"] == {
        "triton.cudagraphs": False, "guard_filter_fn": guard_filter
    }
    assert graph_free_compile_kwargs(CompileConfig(mode="default")) is None   # no CUDA graphs asked for
    assert graph_free_compile_kwargs(CompileConfig(backend="aot_eager")) is None


@pytest.mark.parametrize("kind", KINDS)
def test_a_saved_prompt_state_continues_like_the_original(kind, tmp_path):
    model = tiny_model(kind)
    prompt = random_ids(2, 9, seed=6)
    cache = cache_after(model, prompt)
    save_prompt_state(cache, tmp_path / "prompt.safetensors")
    loaded = load_prompt_state(tmp_path / "prompt.safetensors", model.config)
    assert loaded.get_seq_length() == 9

    question = torch.cat([prompt, random_ids(2, 3, seed=7)], dim=1)   # the prompt, then new tokens
    from_original = model.generate(question, past_key_values=cache, max_new_tokens=7, min_new_tokens=7)
    from_loaded = model.generate(question, past_key_values=loaded, max_new_tokens=7, min_new_tokens=7)
    from_scratch = model.generate(question, max_new_tokens=7, min_new_tokens=7)
    assert torch.equal(from_loaded, from_original)
    assert torch.equal(from_loaded, from_scratch)


def test_loading_a_file_that_is_no_prompt_state_raises(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a prompt state"):
        load_prompt_state(tmp_path / "other.safetensors", tiny_model("pure").config)


def test_streaming_yields_the_generated_text():
    model, tokenizer = tiny_model("hybrid"), char_tokenizer()
    prompt = tokenizer(PROMPT, return_tensors="pt")
    expected = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    thread = threading.Thread(
        target=model.generate, kwargs=dict(**prompt, max_new_tokens=8, min_new_tokens=8, streamer=streamer)
    )
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == tokenizer.decode(expected[0, 4:]) and len(streamed) == 8


def test_stop_strings_end_generation_at_the_string():
    model, tokenizer = tiny_model("hybrid"), char_tokenizer()
    prompt = tokenizer(PROMPT, return_tensors="pt")
    free = model.generate(**prompt, max_new_tokens=10, min_new_tokens=10)[0, 4:]
    stop_word = tokenizer.decode(free[3:4])   # the fourth generated word
    first = free.tolist().index(free[3].item())
    stopped = model.generate(**prompt, max_new_tokens=10, stop_strings=[stop_word], tokenizer=tokenizer)[0, 4:]
    assert torch.equal(stopped, free[: first + 1])


def test_text_generation_pipeline():
    model, tokenizer = tiny_model("pure"), char_tokenizer()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator(PROMPT, max_new_tokens=5, min_new_tokens=5, do_sample=False)[0]["generated_text"]
    ids = tokenizer(PROMPT, return_tensors="pt")
    assert ids["input_ids"].tolist() == [[3, 14, 15, 9]]
    expected = tokenizer.decode(model.generate(**ids, max_new_tokens=5, min_new_tokens=5)[0])
    assert text == expected and len(text) == 9


@pytest.mark.parametrize("cache_class", [M2RNNCache, M2RNNStaticCache])
def test_triton_decode_steps_match_the_torch_backend(cache_class, monkeypatch):
    """Decode steps on the Triton backend (the conv step kernel and the scan; the interpreter on a CPU) give the
    torch backend's logits."""
    from modeling_m2rnn.kernels.short_conv import triton_decode_step

    conv_steps, kernel = [], triton_decode_step.causal_conv1d_step_triton
    monkeypatch.setattr(triton_decode_step, "causal_conv1d_step_triton",
                        lambda *args: conv_steps.append(1) or kernel(*args))
    prompt, new_tokens = random_ids(2, 5), random_ids(2, 3, seed=1)
    logits = {}
    for backend in ("torch", "triton"):
        model = tiny_model("hybrid", m2rnn_kernel_backend=backend)
        cache = cache_class(model.config) if cache_class is M2RNNCache else cache_class(model.config, max_cache_len=9)
        with torch.no_grad():   # as in generate
            steps = [model(prompt, past_key_values=cache).logits[:, -1]]
            for token in new_tokens.T:
                steps.append(model(token[:, None], past_key_values=cache).logits[:, -1])
        logits[backend] = torch.stack(steps)
    assert len(conv_steps) == 3 * model.config.layer_types.count("linear_attention")
    model(new_tokens[:, :1], past_key_values=cache)   # the kernel has no backward: a step that may need one skips it
    assert len(conv_steps) == 3 * model.config.layer_types.count("linear_attention")
    error = (logits["triton"] - logits["torch"]).norm() / logits["torch"].norm()
    assert error < 1e-5   # float32 throughout (seen: ~1e-7)

