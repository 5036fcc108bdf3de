"""The transformers classes: M2RNNModel, M2RNNForCausalLM, M2RNNForSequenceClassification."""

import math
import os

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_causal_mask, create_recurrent_attention_mask, find_packed_sequence_indices
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
from transformers.utils import can_return_tuple
from transformers.utils import hub as transformers_hub
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from ..configuration import M2RNNConfig
from ..configuration.configuration_m2rnn import ATTENTION_LAYER, M2RNN_LAYER, SPARSE_MLP
from ..distributed import check_tensor_parallel_degree, cut_to_local_heads, gather_full_tensors, is_split_by_heads
from ..generation import CACHE_OUTPUT_FIELD, M2RNNCache, M2RNNGenerationMixin, M2RNNStaticCache, as_m2rnn_cache
from ..layers import (
    Attention,
    Experts,
    GatedDeltaNet,
    GatedMLP,
    M2RNNMixer,
    PackedSequences,
    RMSNorm,
    SparseMoeMLP,
    TopKRouter,
)
from ..remote_code import AUTO_MAP, check_remote_code_targets, export_remote_code
from .input_checks import check_inputs


class M2RNNDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x += mixer(norm(x)); x += mlp(norm(x)), the mixer an M2RNN layer, a Gated DeltaNet layer or
    attention (`config.mixer_types`), the MLP a dense SwiGLU or a sparse mixture of experts
    (`config.mlp_layer_types`)."""

    def __init__(self, config: M2RNNConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.mixer_type = config.mixer_types[layer_idx]
        if self.mixer_type == "m2rnn":
            self.m2rnn = M2RNNMixer(config, layer_idx)
        elif self.mixer_type == "gated_deltanet":
            self.gated_deltanet = GatedDeltaNet(config, layer_idx)
        else:
            self.self_attn = Attention(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SparseMoeMLP(config) if config.mlp_layer_types[layer_idx] == SPARSE_MLP else GatedMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask=None,
        position_embeddings=None,
        packed: PackedSequences | None = None,
        past_key_values=None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        if self.mixer_type == "m2rnn":
            hidden_states = self.m2rnn(hidden_states, attention_mask, packed, past_key_values)
        elif self.mixer_type == "gated_deltanet":
            hidden_states = self.gated_deltanet(hidden_states, attention_mask, packed, past_key_values)
        else:
            hidden_states, _ = self.self_attn(
                hidden_states, attention_mask, position_embeddings, past_key_values, **kwargs
            )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class M2RNNPreTrainedModel(PreTrainedModel):
    config: M2RNNConfig
    config_class = M2RNNConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["M2RNNDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    # created in float32 and kept there on every load, bf16 included: a bf16 decay rounds f near 1 to 1
    _keep_in_fp32_modules_strict = ["A_log", "dt_bias"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _is_stateful = True
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": M2RNNDecoderLayer,
        "attentions": Attention,
        "router_logits": OutputRecorder(TopKRouter, index=0),
    }

    def _initialize_weights(self, module, is_custom_code: bool = False):
        """As transformers' own models: every module reaches `_init_weights`. Left as code from outside transformers'
        tree, a module without parameters of its own would be skipped (a guard for remote code that writes weights in
        place), and the blocks that depth-scale a child's weights (GatedMLP, Attention) would never run; ours writes
        through transformers.initialization, which leaves loaded weights alone."""
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        config = self.config
        output_std = config.initializer_range / math.sqrt(2 * config.num_hidden_layers)
        if isinstance(module, M2RNNMixer):
            self._init_recurrence(module)
            init.normal_(module.out_proj.weight, mean=0.0, std=output_std)
        elif isinstance(module, GatedDeltaNet):
            self._init_gated_deltanet(module)
            init.normal_(module.o_proj.weight, mean=0.0, std=output_std)
        elif isinstance(module, Attention):
            init.normal_(module.o_proj.weight, mean=0.0, std=output_std)
        elif isinstance(module, GatedMLP):
            init.normal_(module.down_proj.weight, mean=0.0, std=output_std)
        elif isinstance(module, TopKRouter):
            init.normal_(module.weight, mean=0.0, std=config.initializer_range)
        elif isinstance(module, Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=config.initializer_range)
            init.normal_(module.down_proj, mean=0.0, std=output_std)

    def _init_recurrence(self, mixer: M2RNNMixer):
        """docs/design.md, "The layer": W = I, D = 1, A ~ U[A_init_min, A_init_max], dt log-uniform in [dt_min, dt_max],
        floored."""
        config = self.config
        A_range = (config.m2rnn_A_init_min, config.m2rnn_A_init_max)
        _init_decay(mixer, A_range, (config.m2rnn_dt_init_min, config.m2rnn_dt_init_max), config.m2rnn_dt_init_floor)
        init.copy_(mixer.W, torch.eye(mixer.value_head_dim).expand_as(mixer.W))
        if mixer.D is not None:
            init.ones_(mixer.D)
        if mixer.conv_kernel_size is not None:
            bound = 1 / math.sqrt(mixer.conv_kernel_size)   # nn.Conv1d's default for a depthwise kernel
            init.uniform_(mixer.conv_weight, -bound, bound)

    def _init_gated_deltanet(self, mixer: GatedDeltaNet):
        """A and dt as the M2RNN layers' (lm-engine's SoftplusDecayGate), the conv as a depthwise nn.Conv1d."""
        config = self.config
        A_range = (config.gdn_A_init_min, config.gdn_A_init_max)
        dt_range = (config.gdn_dt_init_min, config.gdn_dt_init_max)
        _init_decay(mixer, A_range, dt_range, config.gdn_dt_init_floor)
        bound = 1 / math.sqrt(mixer.conv_kernel_size)
        init.uniform_(mixer.conv_weight, -bound, bound)

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        """True: the MoE layers run through transformers' experts implementations. (transformers looks for their
        decorator in the model class's own file, and the experts live in layers/moe.py; without this it would fall
        back to "eager" silently.)"""
        return True

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """Nothing to register: every checkpoint this package saves already carries the model's code and an
        `auto_map` for AutoConfig, AutoModel, AutoModelForCausalLM and AutoModelForSequenceClassification.
        (transformers' own mechanism copies single files and cannot carry this package's sub-packages.)"""
        name = auto_class if isinstance(auto_class, str) else auto_class.__name__
        if name not in AUTO_MAP:
            raise ValueError(f"`auto_class` must be one of {sorted(AUTO_MAP)}, got {name!r}")

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """Also writes the model's code beside the weights, so `trust_remote_code=True` loads the checkpoint
        where this package is not installed. A file of the code's names that this package did not write raises a
        ValueError before anything is saved. With `push_to_hub`, the upload holds the code and `auto_map` too: the
        folder is saved first, then pushed as transformers pushes it (the files this save wrote). A model split by
        heads across ranks (tensor parallelism) is saved whole: every rank calls this, the first writes."""
        is_main_process = kwargs.get("is_main_process", True)
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            is_main_process = False
        if is_split_by_heads(self) and kwargs.get("state_dict") is None:
            kwargs["state_dict"] = gather_full_tensors(self, self.state_dict())
        if is_main_process:
            os.makedirs(save_directory, exist_ok=True)
            check_remote_code_targets(save_directory)
        hub_kwargs = {name: kwargs.pop(name) for name in ("commit_message", "repo_id", "create_pr") if name in kwargs}
        files_timestamps = self._get_files_timestamps(save_directory) if push_to_hub else None
        super().save_pretrained(save_directory, *args, **kwargs)
        if not is_main_process:
            return
        export_remote_code(save_directory)
        if push_to_hub:
            token = kwargs.get("token")
            repo_id = hub_kwargs.get("repo_id", os.path.basename(os.path.normpath(save_directory)))
            repo_id = transformers_hub.hf_api().create_repo(repo_id, exist_ok=True, token=token).repo_id
            model_card = transformers_hub.create_and_tag_model_card(repo_id, self.model_tags, token=token)
            model_card.save(os.path.join(save_directory, "README.md"))
            self._upload_modified_files(
                save_directory,
                repo_id,
                files_timestamps,
                commit_message=hub_kwargs.get("commit_message"),
                token=token,
                create_pr=hub_kwargs.get("create_pr", False),
            )

    @classmethod
    def maybe_distribute_model(cls, model, distributed_config, device_mesh):
        """Checks that the tensor-parallel degree splits every layer's heads before transformers applies the plan."""
        if distributed_config is not None and (distributed_config.tp_size or 1) > 1:
            check_tensor_parallel_degree(model.config, distributed_config.tp_size)
        return super().maybe_distribute_model(model, distributed_config, device_mesh)

    @staticmethod
    def _finalize_model_loading(model, *args, **kwargs):
        """Once loaded, the M2RNN layers split by heads keep only this rank's part (distributed/tensor_parallel.py)."""
        loading_info = PreTrainedModel._finalize_model_loading(model, *args, **kwargs)
        cut_to_local_heads(model)
        return loading_info


def _init_decay(mixer, A_range, dt_range, dt_floor: float):
    """Mamba2's decay initialisation: A ~ U[A_range], A_log = log A; dt log-uniform in dt_range, floored, and
    dt_bias = softplus⁻¹(dt)."""
    A = torch.empty_like(mixer.A_log).uniform_(*A_range).clamp_min(1e-4)   # log(0) would be -inf
    init.copy_(mixer.A_log, A.log())
    dt_low, dt_high = dt_range
    dt = torch.empty_like(mixer.dt_bias).uniform_(math.log(dt_low), math.log(dt_high)).exp().clamp_min(dt_floor)
    init.copy_(mixer.dt_bias, dt + torch.log(-torch.expm1(-dt)))   # softplus(dt_bias) = dt


class M2RNNModel(M2RNNPreTrainedModel):
    def __init__(self, config: M2RNNConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([M2RNNDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config) if config.use_rope else None
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        cache=None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        # (a DynamicCache or StaticCache the caller built becomes ours, in place: see as_m2rnn_cache)
        past_key_values = as_m2rnn_cache(past_key_values if past_key_values is not None else cache, self.config)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` (B, S) or `inputs_embeds` (B, S, hidden_size)")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"`input_ids` must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.embed_tokens(input_ids)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"`inputs_embeds` must be (batch, seq_len, {self.config.hidden_size}), got {tuple(inputs_embeds.shape)}"
            )
        batch, seq_len = inputs_embeds.shape[:2]
        check_inputs(inputs_embeds, attention_mask, position_ids, past_key_values)
        # (one-token steps skip the search: compiled decoding stays one graph)
        packed = _find_packed_sequences(position_ids, batch) if position_ids is not None and seq_len > 1 else None
        # Sequences packed in a row (position_ids restarting, no mask) are kept apart in the attention layers only
        # without a cache: transformers' masks ignore packing once there is one.
        packed_attention = packed is not None and attention_mask is None and ATTENTION_LAYER in self.config.layer_types
        if packed_attention and past_key_values is not None:
            raise ValueError(
                "`position_ids` restart within a row (packed sequences) and a cache was given: the attention layers "
                "would attend across the sequences. Pass one sequence per row, or no cache (use_cache=False)"
            )

        if use_cache and past_key_values is None and not self.training and not packed_attention:
            # (in training a cache would only hide packed sequences from transformers' attention masks)
            past_key_values = M2RNNCache(config=self.config)
        # No padding, no packing, no cache: SDPA's `is_causal` (its flash kernel, which skips the blocks above the
        # diagonal) is the attention mask. transformers decides this only outside torch.compile, where it can read the
        # inputs' values; compiled, it would hand SDPA a (B, 1, S, S) mask and a kernel that computes every block.
        causal_by_sdpa = (
            attention_mask is None and position_ids is None and past_key_values is None
            and self.config._attn_implementation == "sdpa"
        )
        if position_ids is None:
            past_seen_tokens = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(seq_len, device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        if isinstance(attention_mask, dict):
            masks = attention_mask   # built by generate for compileable caches, one entry per layer type
        else:
            masks = {M2RNN_LAYER: create_recurrent_attention_mask(self.config, inputs_embeds, attention_mask)}
            if ATTENTION_LAYER in self.config.layer_types:
                # the cache goes by position: transformers renamed that argument after 5.17
                masks[ATTENTION_LAYER] = None if causal_by_sdpa else create_causal_mask(
                    self.config, inputs_embeds, attention_mask, past_key_values, position_ids=position_ids
                )
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids) if self.rotary_emb is not None else None

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[layer.layer_type],
                position_embeddings=position_embeddings,
                packed=packed,
                past_key_values=past_key_values,
                **kwargs,
            )
        if isinstance(past_key_values, (M2RNNCache, M2RNNStaticCache)):
            past_key_values.advance(seq_len, inputs_embeds.device)
        return MoeModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states), **{CACHE_OUTPUT_FIELD: past_key_values}
        )


@torch.compiler.disable
def _find_packed_sequences(position_ids: torch.Tensor, batch: int) -> PackedSequences | None:
    """Sequences packed in a row restart their positions; the recurrence and the conv restart with them. Where they
    restart is read from the positions' values: under torch.compile this runs outside the graph (a graph break), so
    that a compiled model keeps packed sequences apart too."""
    sequence_ids = find_packed_sequence_indices(position_ids.expand(batch, -1))
    return None if sequence_ids is None else PackedSequences.from_sequence_ids(sequence_ids)


class M2RNNForCausalLM(M2RNNGenerationMixin, M2RNNPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: M2RNNConfig):
        super().__init__(config)
        self.model = M2RNNModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache=None,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        """With `output_router_logits` (default: the config's), also the router logits of the sparse MLP layers, one
        (B·S, num_experts) tensor per layer, and transformers' load-balancing loss over them (padding excluded by a 2-D
        `attention_mask`), which is added to the loss times `router_aux_loss_coef` when `labels` are given."""
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values if past_key_values is not None else cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, kept, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        aux_loss = None
        if output_router_logits and outputs.router_logits:
            aux_loss = load_balancing_loss_func(
                outputs.router_logits,
                self.config.num_experts,
                self.config.num_experts_per_tok,
                _padding_mask_of_these_tokens(attention_mask, hidden_states.shape[1]),
            )
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            **{CACHE_OUTPUT_FIELD: getattr(outputs, CACHE_OUTPUT_FIELD)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

def _padding_mask_of_these_tokens(attention_mask, seq_len: int) -> torch.Tensor | None:
    """The (B, S) padding mask of this forward's S tokens, whose router logits the load-balancing loss reads: the last
    S columns of a 2-D mask (it also covers any cached tokens); None (every token counts) for no mask or another
    form."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        return attention_mask[:, -seq_len:]
    return None



class M2RNNForSequenceClassification(GenericForSequenceClassification, M2RNNPreTrainedModel):
    pass


__all__ = [
    "M2RNNForCausalLM",
    "M2RNNForSequenceClassification",
    "M2RNNModel",
    "M2RNNPreTrainedModel",
]
