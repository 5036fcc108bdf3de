"""M2RNNConfig: the hyper-parameters of an M2RNN or hybrid M2RNN / attention language model."""

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

from ..kernels import BACKENDS, GDN_BACKENDS

# `layer_types` speaks transformers' vocabulary, which also drives the cache and mask dispatch:
# "linear_attention" is transformers' name for a recurrent layer (an M2RNN or a Gated DeltaNet layer).
M2RNN_LAYER = "linear_attention"
ATTENTION_LAYER = "full_attention"
# `mixer_types` says which token mixer each layer is; a recurrent mixer's name also stands for its cache kind.
MIXER_TYPES = ("m2rnn", "gated_deltanet", "attention")
_LAYER_TYPE_ALIASES = {"m2rnn": M2RNN_LAYER, "gated_deltanet": M2RNN_LAYER}
# The backend field's name before it governed the short conv and the gated norm as well as the scan.
_OLD_BACKEND_FIELD = "m2rnn_scan_backend"
# Fields of configs saved before the scalar init fields, read on load and never written back.
_LEGACY_INIT_RANGES = {
    "m2rnn_A_init_range": ("m2rnn_A_init_min", "m2rnn_A_init_max"),
    "m2rnn_dt_init_range": ("m2rnn_dt_init_min", "m2rnn_dt_init_max"),
}
# `mlp_layer_types`: a dense SwiGLU MLP or a sparse mixture of experts after the mixer, as transformers' MoE hybrids say
DENSE_MLP = "dense"
SPARSE_MLP = "sparse"


@strict
class M2RNNConfig(PreTrainedConfig):
    r"""
    Configuration of an M2RNN language model (arXiv 2603.14360): a pre-norm decoder whose layers mix tokens
    either with the M2RNN recurrence (`"linear_attention"`, alias `"m2rnn"`) or with softmax attention
    (`"full_attention"`), each followed by a SwiGLU MLP. The defaults are the paper's 400M pure M2RNN;
    `M2RNNConfig.from_preset("hybrid-m2rnn-400m")` gives the hybrid with attention at layers 4, 12 and 20.

    M2RNN fields (per layer, `N = max` of the head counts, every count dividing `N`):
        m2rnn_k_head_dim (K), m2rnn_v_head_dim (V): the state of a head is a K×V matrix.
        m2rnn_num_{q,k,v,f,g,weight}_heads: heads of the query, key, value, forget gate, output gate and of
            the V×V transition matrices W; an input with fewer heads is shared by consecutive heads.
        m2rnn_conv_kernel_size: depthwise causal convolution (+ SiLU) on q, k, v; `None` for none.
        m2rnn_use_residual: adds `D ⊙ v` to the recurrence output.
        m2rnn_gradient_clipping: clamps the gradient reaching each state to [-c, c]; `None` for no clamp.
        m2rnn_A_init_min, m2rnn_A_init_max: A ~ U[min, max] at init (Mamba2-style forget gate).
        m2rnn_dt_init_min, m2rnn_dt_init_max, m2rnn_dt_init_floor: dt log-uniform in [min, max], floored, at init.
            (Configs saved with the former `m2rnn_A_init_range` / `m2rnn_dt_init_range` pairs still load.)
        m2rnn_kernel_backend: the implementation of every M2RNN op (scan, short conv, gated norm): "auto" (Triton
            on CUDA, else the PyTorch references), "torch" or "triton". Configs that name it `m2rnn_scan_backend`
            load with it.

    Gated DeltaNet layers (`mixer_types` entry "gated_deltanet", or `layer_types` alias "gated_deltanet"), lm-engine's:
        gdn_num_heads (H), gdn_num_k_heads (q and k heads, each shared by H / gdn_num_k_heads heads; None for H),
        gdn_key_head_dim (K), gdn_value_head_dim (V): the state of a head is a K×V matrix.
        gdn_conv_kernel_size: depthwise causal convolution (+ SiLU) on q, k, v.
        gdn_use_gate: the output gate silu(gate), applied before the per-head RMSNorm.
        gdn_allow_neg_eigval: beta = 2·sigmoid(b) instead of sigmoid(b).
        gdn_A_init_min/max, gdn_dt_init_min/max, gdn_dt_init_floor: Mamba2-style decay initialisation.
        gdn_backend: "auto" (fla-core's kernels on CUDA when installed, else the PyTorch reference), "torch" or "fla".
    `mixer_types[i]` ("m2rnn", "gated_deltanet", "attention") names each layer's mixer; by default every
    "linear_attention" layer is an M2RNN layer.

    MLP fields: `mlp_layer_types[i]` is "dense" (SwiGLU of width `intermediate_size`, the default for every layer) or
    "sparse" (mixture of experts): a router picks `num_experts_per_tok` of `num_experts` SwiGLU experts of width
    `moe_intermediate_size` by their router logits, weighted by the softmax over the chosen logits
    (`norm_topk_prob=True`, the paper's; `False` weighs them by their softmax over all experts), plus one ungated
    shared expert of width `shared_expert_intermediate_size` (0 for none). With `output_router_logits` the causal LM
    returns the router logits and transformers' load-balancing loss, added to the loss times `router_aux_loss_coef`.

    Attention layers: `num_attention_heads`, `num_key_value_heads` (GQA), `head_dim`; no positional encoding
    (NoPE, as in the paper) unless `use_rope=True`, with transformers' `rope_parameters` (e.g. `{"rope_theta": 1e4}`);
    without RoPE `rope_parameters` is None: there is nothing for them to act on.

    ```python
    >>> from modeling_m2rnn import M2RNNConfig, M2RNNForCausalLM
    >>> config = M2RNNConfig(hidden_size=64, num_hidden_layers=2, layer_types=["m2rnn", "full_attention"])
    >>> model = M2RNNForCausalLM(config)
    ```
    """

    model_type = "m2rnn"
    keys_to_ignore_at_inference = ["past_key_values"]
    base_model_tp_plan = {
        # recurrent layers split by heads: distributed/tensor_parallel.py
        "layers.*.m2rnn": "m2rnn_heads",
        "layers.*.gated_deltanet": "gated_deltanet_heads",
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
        # the mixture of experts: every expert split along its intermediate width, as transformers' MoE models do
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.mlp.shared_expert.gate_proj": "colwise",
        "layers.*.mlp.shared_expert.up_proj": "colwise",
        "layers.*.mlp.shared_expert.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 100352
    hidden_size: int = 1024
    intermediate_size: int = 2752
    num_hidden_layers: int = 24
    hidden_act: str = "silu"
    layer_types: list[str] | None = None
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    use_rope: bool = False
    rope_parameters: dict | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    m2rnn_k_head_dim: int = 64
    m2rnn_v_head_dim: int = 16
    m2rnn_num_q_heads: int = 1
    m2rnn_num_k_heads: int = 1
    m2rnn_num_v_heads: int = 84
    m2rnn_num_f_heads: int = 84
    m2rnn_num_g_heads: int = 84
    m2rnn_num_weight_heads: int = 84
    m2rnn_conv_kernel_size: int | None = 4
    m2rnn_use_residual: bool = True
    m2rnn_gradient_clipping: float | None = 1.0
    m2rnn_A_init_min: float | int = 0.0
    m2rnn_A_init_max: float | int = 16.0
    m2rnn_dt_init_min: float | int = 1e-3
    m2rnn_dt_init_max: float | int = 0.1
    m2rnn_dt_init_floor: float | int = 1e-4
    m2rnn_kernel_backend: str = "auto"
    mixer_types: list[str] | None = None
    gdn_num_heads: int = 2
    gdn_num_k_heads: int | None = None
    gdn_key_head_dim: int = 256
    gdn_value_head_dim: int = 512
    gdn_conv_kernel_size: int = 4
    gdn_use_gate: bool = True
    gdn_allow_neg_eigval: bool = False
    gdn_A_init_min: float = 0.0
    gdn_A_init_max: float = 16.0
    gdn_dt_init_min: float = 1e-3
    gdn_dt_init_max: float = 0.1
    gdn_dt_init_floor: float = 1e-4
    gdn_backend: str = "auto"
    mlp_layer_types: list[str] | None = None
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 256
    shared_expert_intermediate_size: int = 1024
    norm_topk_prob: bool = True
    router_aux_loss_coef: float | int = 0.001
    output_router_logits: bool = False

    def __post_init__(self, **kwargs):
        if _OLD_BACKEND_FIELD in kwargs:
            self.m2rnn_kernel_backend = kwargs.pop(_OLD_BACKEND_FIELD)
        self._resolve_layer_and_mixer_types()
        if self.mlp_layer_types is None:
            self.mlp_layer_types = [DENSE_MLP] * self.num_hidden_layers
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for legacy_name, (low_name, high_name) in _LEGACY_INIT_RANGES.items():
            if legacy_name in kwargs:
                bounds = kwargs.pop(legacy_name)
                if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
                    raise ValueError(f"`{legacy_name}` must be [low, high], got {bounds!r}")
                setattr(self, low_name, float(bounds[0]))
                setattr(self, high_name, float(bounds[1]))
        layer_types = self.layer_types
        super().__post_init__(**kwargs)
        # Later transformers remap legacy names ("mamba", "attention") in there; this model refuses them instead.
        self.layer_types = layer_types
        if not self.use_rope:
            self.rope_parameters = None

    def _resolve_layer_and_mixer_types(self):
        """Fill in whichever of `layer_types` and `mixer_types` is missing from the other. A `layer_types` alias
        ("m2rnn", "gated_deltanet") names the mixer too; where `mixer_types` says otherwise the alias stays, for
        `validate_layer_mixers` to report."""
        mixers = self.mixer_types if isinstance(self.mixer_types, list) else None
        if self.layer_types is None:
            # (from a `mixer_types` of the wrong length, the default, so that the validators name `mixer_types`)
            fits = mixers is not None and len(mixers) == self.num_hidden_layers
            implied = mixers if fits else ["m2rnn"] * self.num_hidden_layers
            self.layer_types = [ATTENTION_LAYER if m == "attention" else M2RNN_LAYER for m in implied]
        # Only our own aliases: transformers' legacy names ("mamba", "conv") are other layers, refused by the validator.
        layer_types = list(self.layer_types) if isinstance(self.layer_types, tuple) else self.layer_types
        if self.mixer_types is None:
            self.mixer_types = [
                t if t in _LAYER_TYPE_ALIASES else "attention" if t == ATTENTION_LAYER else "m2rnn" for t in layer_types
            ]

        def cache_kind(i: int, layer_type: str) -> str:
            if layer_type in _LAYER_TYPE_ALIASES and mixers is not None and i < len(mixers) and mixers[i] != layer_type:
                return layer_type   # contradicted by `mixer_types`: left for validate_layer_mixers to report
            return _LAYER_TYPE_ALIASES.get(layer_type, layer_type)

        self.layer_types = [cache_kind(i, t) for i, t in enumerate(layer_types)]

    @property
    def m2rnn_num_heads(self) -> int:
        """N: the number of recurrent heads, the largest of the M2RNN head counts."""
        return max(self._m2rnn_head_counts().values())

    def _m2rnn_head_counts(self) -> dict[str, int]:
        return {
            name: getattr(self, name)
            for name in (
                "m2rnn_num_q_heads",
                "m2rnn_num_k_heads",
                "m2rnn_num_v_heads",
                "m2rnn_num_f_heads",
                "m2rnn_num_g_heads",
                "m2rnn_num_weight_heads",
            )
        }

    def validate_layer_type(self):
        allowed = (M2RNN_LAYER, ATTENTION_LAYER)
        known = (*allowed, *_LAYER_TYPE_ALIASES)   # an alias left here contradicts `mixer_types`: reported there
        if not isinstance(self.layer_types, list) or any(t not in known for t in self.layer_types):
            raise ValueError(
                f"`layer_types` entries must be one of {allowed} (or the aliases {tuple(_LAYER_TYPE_ALIASES)}; no "
                f"other recurrent layer, such as 'mamba' or 'conv', is implemented), got {self.layer_types}"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"`layer_types` must have one entry per layer: num_hidden_layers={self.num_hidden_layers}, "
                f"got {len(self.layer_types)} entries"
            )

    def validate_layer_mixers(self):
        mixers = self.mixer_types
        if not isinstance(mixers, list) or any(m not in MIXER_TYPES for m in mixers):
            raise ValueError(f"`mixer_types` entries must be one of {MIXER_TYPES}, got {mixers}")
        layer_types_fit = isinstance(self.layer_types, list) and len(self.layer_types) == self.num_hidden_layers
        if len(mixers) != self.num_hidden_layers and layer_types_fit:   # else validate_layer_type names `layer_types`
            raise ValueError(
                f"`mixer_types` must have one entry per layer: num_hidden_layers={self.num_hidden_layers}, "
                f"got {len(mixers)} entries"
            )
        if not isinstance(self.layer_types, list):
            return   # validate_layer_type reports it
        for i, (mixer, layer_type) in enumerate(zip(mixers, self.layer_types)):
            expected = ATTENTION_LAYER if mixer == "attention" else M2RNN_LAYER
            contradicted = layer_type in (M2RNN_LAYER, ATTENTION_LAYER) and layer_type != expected
            if contradicted or layer_type in _LAYER_TYPE_ALIASES:   # an alias is left only where it contradicts
                raise ValueError(
                    f"`mixer_types[{i}]` = {mixer!r} disagrees with `layer_types[{i}]` = {layer_type!r}: attention "
                    f"is a {ATTENTION_LAYER!r} layer, a recurrent mixer a {M2RNN_LAYER!r} layer (or one of its own "
                    "name)"
                )

    def validate_mlp_layer_types(self):
        allowed = (DENSE_MLP, SPARSE_MLP)
        if not isinstance(self.mlp_layer_types, list) or any(t not in allowed for t in self.mlp_layer_types):
            raise ValueError(f"`mlp_layer_types` entries must be one of {allowed}, got {self.mlp_layer_types}")
        if len(self.mlp_layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"`mlp_layer_types` must have one entry per layer: num_hidden_layers={self.num_hidden_layers}, "
                f"got {len(self.mlp_layer_types)} entries"
            )
        if SPARSE_MLP in self.mlp_layer_types:
            self._validate_experts()

    def _validate_experts(self):
        if self.num_experts <= 0:
            raise ValueError(
                f"`num_experts` must be positive where `mlp_layer_types` has a 'sparse' layer, got {self.num_experts}"
            )
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"`num_experts_per_tok` must be in [1, `num_experts` = {self.num_experts}], got "
                f"{self.num_experts_per_tok}"
            )
        if self.moe_intermediate_size <= 0:
            raise ValueError(f"`moe_intermediate_size` must be positive, got {self.moe_intermediate_size}")
        if self.shared_expert_intermediate_size < 0:
            raise ValueError(
                f"`shared_expert_intermediate_size` must be >= 0 (0 for no shared expert), got "
                f"{self.shared_expert_intermediate_size}"
            )
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"`router_aux_loss_coef` must be >= 0, got {self.router_aux_loss_coef}")

    def validate_architecture(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "m2rnn_k_head_dim",
                     "m2rnn_v_head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}")
        # the embedding row of the padding token is kept at zero: it must exist
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"`pad_token_id` must be None or a token id below `vocab_size` = {self.vocab_size}, got "
                f"{self.pad_token_id}"
            )
        counts = self._m2rnn_head_counts()
        num_heads = max(counts.values())
        for name, count in counts.items():
            if count <= 0 or num_heads % count:
                raise ValueError(
                    f"`{name}` = {count} must be positive and divide N = max of the M2RNN head counts = {num_heads}"
                )
        kernel = self.m2rnn_conv_kernel_size
        if kernel is not None and kernel < 2:
            raise ValueError(f"`m2rnn_conv_kernel_size` must be >= 2 (or None for no convolution), got {kernel}")
        clip = self.m2rnn_gradient_clipping
        if clip is not None and not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"`m2rnn_gradient_clipping` must be finite and positive (or None for none), got {clip}")
        if self.m2rnn_kernel_backend not in BACKENDS:
            raise ValueError(f"`m2rnn_kernel_backend` must be one of {BACKENDS}, got {self.m2rnn_kernel_backend!r}")
        if ATTENTION_LAYER in self.layer_types:
            self._validate_attention()
        if isinstance(self.mixer_types, list) and "gated_deltanet" in self.mixer_types:
            self._validate_gated_deltanet()

    def validate_numerics(self):
        """The floats the layers compute with: a NaN or a sign error here gives NaN logits, not an error."""
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ValueError(f"`rms_norm_eps` must be finite and positive, got {self.rms_norm_eps}")
        if not (math.isfinite(self.initializer_range) and self.initializer_range >= 0):
            raise ValueError(f"`initializer_range` must be finite and >= 0, got {self.initializer_range}")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` must be one of transformers' ACT2FN, got {self.hidden_act!r}")
        low, high = self.m2rnn_A_init_min, self.m2rnn_A_init_max
        if not (math.isfinite(high) and 0 <= low < high):
            raise ValueError(
                f"`m2rnn_A_init_min`, `m2rnn_A_init_max` must satisfy 0 <= min < max (finite), got {low}, {high}"
            )
        low, high = self.m2rnn_dt_init_min, self.m2rnn_dt_init_max
        if not (math.isfinite(high) and 0 < low <= high):
            raise ValueError(
                f"`m2rnn_dt_init_min`, `m2rnn_dt_init_max` must satisfy 0 < min <= max (finite), got {low}, {high}"
            )
        floor = self.m2rnn_dt_init_floor
        if not (math.isfinite(floor) and floor >= 0):
            raise ValueError(f"`m2rnn_dt_init_floor` must be finite and >= 0, got {floor}")

    def _validate_gated_deltanet(self):
        for name in ("gdn_num_heads", "gdn_key_head_dim", "gdn_value_head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}")
        k_heads = self.gdn_num_k_heads
        if k_heads is not None and (k_heads <= 0 or self.gdn_num_heads % k_heads):
            raise ValueError(
                f"`gdn_num_k_heads` = {k_heads} must be positive and divide `gdn_num_heads` = {self.gdn_num_heads} "
                "(or be None for one q and k head per head)"
            )
        if self.gdn_conv_kernel_size < 2:
            raise ValueError(f"`gdn_conv_kernel_size` must be >= 2, got {self.gdn_conv_kernel_size}")
        if not 0 <= self.gdn_A_init_min < self.gdn_A_init_max:
            raise ValueError(
                f"`gdn_A_init_min` and `gdn_A_init_max` must satisfy 0 <= min < max, got {self.gdn_A_init_min} and "
                f"{self.gdn_A_init_max}"
            )
        if not 0 < self.gdn_dt_init_min <= self.gdn_dt_init_max:
            raise ValueError(
                f"`gdn_dt_init_min` and `gdn_dt_init_max` must satisfy 0 < min <= max, got {self.gdn_dt_init_min} and "
                f"{self.gdn_dt_init_max}"
            )
        if self.gdn_backend not in GDN_BACKENDS:
            raise ValueError(f"`gdn_backend` must be one of {GDN_BACKENDS}, got {self.gdn_backend!r}")

    def _validate_attention(self):
        if self.num_attention_heads <= 0 or self.head_dim is None or self.head_dim <= 0:
            raise ValueError(
                f"`num_attention_heads` and `head_dim` must be positive, got {self.num_attention_heads} and "
                f"{self.head_dim}"
            )
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_key_value_heads` = {self.num_key_value_heads} must be positive and divide "
                f"`num_attention_heads` = {self.num_attention_heads}"
            )

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig"):
        """Nothing to register: checkpoints saved by `M2RNNPreTrainedModel.save_pretrained` carry the code and an
        `auto_map` already (transformers' own mechanism cannot carry this package's sub-packages)."""
        name = auto_class if isinstance(auto_class, str) else auto_class.__name__
        if name != "AutoConfig":
            raise ValueError(f"`auto_class` must be 'AutoConfig', got {name!r}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "M2RNNConfig":
        """One of the paper's models by name (see `PRESETS`), with any field overridden. A smaller
        `num_hidden_layers` keeps the preset's first layers (a slice of the model, its layer pattern cut to length)."""
        from .presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        fields = {**PRESETS[name], **overrides}
        num_layers = overrides.get("num_hidden_layers")
        for key in ("mixer_types", "mlp_layer_types"):
            if num_layers is not None and key not in overrides:
                fields[key] = fields[key][:num_layers]
        return cls(**fields)


__all__ = ["M2RNNConfig"]
