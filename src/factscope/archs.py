"""The one table of per-architecture differences.

Every analysis sees a model only through :class:`factscope.models.Model`, which reads this table.
Adding a family means adding one row here (and a tiny config in ``models.TINY``), nothing else.
Module paths are relative to the HF ``*ForCausalLM`` object (``layers``, ``embed``, ``final_norm``,
``lm_head``) or to one decoder layer (the others).
"""

from __future__ import annotations

from dataclasses import dataclass

from factscope.errors import FactscopeError


@dataclass(frozen=True)
class ArchSpec:
    family: str
    model_types: tuple[str, ...]  # HF config.model_type values handled by this row
    layers: str  # ModuleList of decoder layers
    embed: str  # token embedding (Gemma's module applies the sqrt(d_model) scale itself)
    final_norm: str
    lm_head: str
    attn: str  # attention module inside a layer
    mlp: str  # MLP module inside a layer
    o_proj: str  # attention output projection inside a layer (its input is the heads' z)
    v_proj: str  # value projection inside a layer
    attn_out: str  # module whose output is what attention adds to the residual stream
    mlp_out: str  # module whose output is what the MLP adds to the residual stream
    attn_in_norm: str  # norm applied to the residual before attention
    conv1d: bool = False  # GPT-2 style Conv1D weights ([in, out]) and fused c_attn (q|k|v)
    post_attn_norm: bool = False  # attn_out is an RMSNorm of o_proj's output (Gemma 2/3)
    rms_offset: bool = False  # RMSNorm multiplies by (1 + w) (Gemma)
    qkv_per_head: bool = False  # v_proj is one fused q|k|v Linear laid out per head: [q_h k_h v_h] (GPT-NeoX)
    parallel: bool = False  # attention and MLP both read resid_pre (GPT-J, GPT-NeoX): the MLP never sees attn_out
    mlp_down: str | None = None  # the MLP's second (down/output) matrix inside a layer; its input is the
    # MLP's hidden activation (GPT-2: GELU(c_fc x); gated MLPs: act(gate x) * up x)
    # Receiving-side points (circuits): the query/key projections inside a layer (``v_proj`` above),
    # whether one module computes [q | k | v] (GPT-2's c_attn; then q_proj = k_proj = v_proj), and
    # the norm in front of the MLP (its input is ``mlp_in``).
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    fused_qkv: bool = False
    mlp_in_norm: str | None = "post_attention_layernorm"  # None: the MLP shares the attention's norm


_LLAMA_LIKE = dict(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    attn="self_attn",
    mlp="mlp",
    o_proj="self_attn.o_proj",
    v_proj="self_attn.v_proj",
    attn_out="self_attn",
    mlp_out="mlp",
    attn_in_norm="input_layernorm",
    mlp_down="mlp.down_proj",
)

ARCHS: tuple[ArchSpec, ...] = (
    ArchSpec(
        family="gpt2",
        model_types=("gpt2",),
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        attn="attn",
        mlp="mlp",
        o_proj="attn.c_proj",
        v_proj="attn.c_attn",
        attn_out="attn",
        mlp_out="mlp",
        attn_in_norm="ln_1",
        conv1d=True,
        mlp_down="mlp.c_proj",
        q_proj="attn.c_attn",
        k_proj="attn.c_attn",
        fused_qkv=True,
        mlp_in_norm="ln_2",
    ),
    ArchSpec(family="llama", model_types=("llama", "mistral"), **_LLAMA_LIKE),
    ArchSpec(family="qwen2", model_types=("qwen2", "qwen3"), **_LLAMA_LIKE),
    ArchSpec(
        family="gemma3",
        model_types=("gemma3_text", "gemma2"),
        **{
            **_LLAMA_LIKE,
            "attn_out": "post_attention_layernorm",
            "mlp_out": "post_feedforward_layernorm",
            "mlp_in_norm": "pre_feedforward_layernorm",
        },
        post_attn_norm=True,
        rms_offset=True,
    ),
    # Gemma (v1): Llama layout with (1 + w) RMSNorms, the sqrt(d) embedding scale inside the
    # embedding module, GeGLU MLP and no post-norms.
    ArchSpec(family="gemma", model_types=("gemma",), **_LLAMA_LIKE, rms_offset=True),
    # GPT-J: one LayerNorm feeds attention and MLP in parallel; separate q/k/v without bias,
    # partial rotary embeddings; the unembedding has a bias (Model.unembed calls the module).
    ArchSpec(
        family="gptj",
        model_types=("gptj",),
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        attn="attn",
        mlp="mlp",
        o_proj="attn.out_proj",
        v_proj="attn.v_proj",
        attn_out="attn",
        mlp_out="mlp",
        attn_in_norm="ln_1",
        parallel=True,
        mlp_down="mlp.fc_out",
        q_proj="attn.q_proj",
        k_proj="attn.k_proj",
        mlp_in_norm=None,  # ln_1 feeds attention and MLP alike: no input of the MLP's own (no mlp_in)
    ),
    # GPT-NeoX / Pythia: parallel attention and MLP (two LayerNorms), fused query_key_value with
    # bias whose output is [q_h k_h v_h] per head, partial rotary embeddings.
    ArchSpec(
        family="gpt_neox",
        model_types=("gpt_neox",),
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        lm_head="lm_head",
        attn="attention",
        mlp="mlp",
        o_proj="attention.dense",
        v_proj="attention.query_key_value",
        attn_out="attention",
        mlp_out="mlp",
        attn_in_norm="input_layernorm",
        qkv_per_head=True,
        parallel=True,
        mlp_down="mlp.dense_4h_to_h",
    ),
)


# --------------------------------------------------------------------------------------------
# Hook points as data (as pyvene's per-family ``type_to_module_mapping`` tables)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Site:
    """Where a hook point lives: ``module`` names an :class:`ArchSpec` field holding the module's path
    inside a decoder layer (``"layer"``: the decoder layer itself; ``"final_norm"``: the model's final
    norm, one module for every layer index), ``io`` whether the point is that module's ``"input"``
    or ``"output"`` (its first element when a tuple), and ``heads`` how heads are split:

    - ``None``: the tensor as it is;
    - ``"split"``: the last dimension viewed as ``[n_heads, head_dim]`` (z);
    - ``"W_O"``: per-head shares of the output projection, ``z_h @ W_O[h]`` (times Gemma's
      post-attention norm factor), summing to ``attn_out``;
    - ``"copy"``: one copy of the input per query head (``q``) or key/value head (``k``, ``v``),
      each projected by its own slice of ``proj`` (the ArchSpec field of that projection);
    - ``"probs"``: recorded inside the attention function (read only).

    ``alias``: the hook sees a view that only this module consumes (the input of a receiver's norm:
    an edit or gradient there is the receiver's own, not the residual add's).
    """

    module: str
    io: str
    heads: str | None = None
    proj: str | None = None
    alias: bool = False
    editable: bool = True


POINT_SITES: dict[str, Site] = {
    "resid_pre": Site("layer", "input"),
    "attn_out": Site("attn_out", "output"),
    "mlp_out": Site("mlp_out", "output"),
    "resid_post": Site("layer", "output"),
    "z": Site("o_proj", "input", heads="split"),
    "mlp_hidden": Site("mlp_down", "input"),
    "head_out": Site("o_proj", "output", heads="W_O"),
    "attn_probs": Site("attn", "output", heads="probs", editable=False),
    "q_in": Site("attn_in_norm", "input", heads="copy", proj="q_proj"),
    "k_in": Site("attn_in_norm", "input", heads="copy", proj="k_proj"),
    "v_in": Site("attn_in_norm", "input", heads="copy", proj="v_proj"),
    "mlp_in": Site("mlp_in_norm", "input", alias=True),
    "logits_in": Site("final_norm", "input", alias=True),
}


def site_path(spec: ArchSpec, point: str) -> str | None:
    """The module path of a point's site in this family (None where the family has no such module)."""
    module = POINT_SITES[point].module
    return "" if module == "layer" else getattr(spec, module)


def supported_model_types() -> list[str]:
    return sorted(t for a in ARCHS for t in a.model_types)


def arch_for(model_type: str) -> ArchSpec:
    for spec in ARCHS:
        if model_type in spec.model_types:
            return spec
    raise FactscopeError(
        f"unsupported architecture {model_type!r}; factscope supports: "
        + ", ".join(supported_model_types())
    )
