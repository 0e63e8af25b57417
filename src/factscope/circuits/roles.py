"""What each node of a circuit does: vocabulary projections, attention, and role labels.

For every chosen node (an attention head ``a{l}.h{h}`` or an MLP ``m{l}``) and every fact, at the
last prompt position:

- **the node's output projected to the vocabulary**: the node's output (its share of the residual
  stream, as the circuit graph defines it: ``head_out``, ``mlp_out``) through the final norm *with
  the norm's scale frozen at the model's final residual* (the norm is linear once its scale is fixed:
  RMSNorm ``w * c / rms(x)``, LayerNorm ``w * (c - mean c) / std(x)``, no bias) and the unembedding
  (no bias). These direct-logit projections of every node plus the attention biases and the norm's
  bias sum to the model's logits (before a final soft-cap). KnowledgeCircuits (``notebook/
  component.ipynb``, ``get_heads_out``/``get_mlp_out``) does the same with TransformerLens'
  ``stack_head_results(apply_ln=True)`` on a LayerNorm-folded model. We record the target's rank in
  it (0 = top), the node's top tokens, and how many of the relation's *other* answers (the first
  tokens of the other facts' targets: the relation's answer type, measurably) are among its top
  ``top_k`` tokens;
- **each head's attention from the last position** to token groups: ``subject`` (the subject's
  tokens), ``relation`` (the other prompt tokens before the last), ``last`` (the query token
  itself), ``other`` (BOS and special tokens), plus any extra groups (``demos`` for in-context
  demonstrations);
- **each MLP's effect on the target's logit-lens rank** at the last position: the rank in the
  stream just before the MLP adds its output and just after (``gain_bits`` = log2 of the rank + 1
  before minus after: 1 bit = the MLP halves the rank).

Role rules (:class:`RoleRules`, defaults in brackets; attention shares and ranks are averaged /
medians over the facts):

- **mixture** head: attends to both the subject and the relation (each share >= ``attn / 2`` [0.15])
  and writes both the target (median rank < ``top_k`` [20]) and relation-type tokens (on average at
  least ``relation_hits`` [1] other answers of the relation in its top ``top_k``);
- **mover** head (otherwise): attends to the subject (share >= ``attn`` [0.3], not less than to the
  relation) and writes the target;
- **relation** head (otherwise): attends to the relation (share >= ``attn``, more than to the
  subject) and writes relation-type tokens;
- **target MLP**: its median ``gain_bits`` is at least ``mlp_gain_bits`` [1].

Tiers: :func:`measure_batch` (one batch), :func:`measure` (facts -> per (fact, node) table),
:func:`node_table` (aggregate + labels), :func:`run_roles` (files, figure, summary, section).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from factscope import hooks
from factscope.circuits.evaluate import target_ranks
from factscope.circuits.graph import Graph
from factscope.errors import FactscopeError
from factscope.facts import Fact, fact_subject_span, target_ids
from factscope.findings import Claim
from factscope.notebook import callable_module

HEAD_ROLES = ("mixture", "mover", "relation")
MLP_ROLE = "target MLP"
GROUPS = ("subject", "relation", "last", "other")


@dataclass(frozen=True)
class RoleRules:
    attn: float = 0.3
    top_k: int = 20
    relation_hits: float = 1.0
    mlp_gain_bits: float = 1.0

    def check(self) -> "RoleRules":
        if not 0 < self.attn <= 1:
            raise FactscopeError(f"the attention threshold must be in (0, 1], not {self.attn}")
        if self.top_k < 1:
            raise FactscopeError(f"top_k must be at least 1, not {self.top_k}")
        if self.relation_hits < 0 or self.mlp_gain_bits < 0:
            raise FactscopeError("relation_hits and mlp_gain_bits must be >= 0")
        return self


def frozen_final_norm(model, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The final norm at the stream ``x [..., d]`` as a linear map applied to ``c [..., n, d]``
    (its scale frozen at ``x``; no bias): the contribution of ``c`` to the normed stream."""
    norm = model.final_norm_module
    xf, cf = x.float().unsqueeze(-2), c.float()
    w = norm.weight.float().to(x.device) if getattr(norm, "weight", None) is not None else torch.ones(x.shape[-1], device=x.device)
    if isinstance(norm, torch.nn.LayerNorm):
        scale = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + norm.eps)
        cf = cf - cf.mean(-1, keepdim=True)
    else:  # RMSNorm (Gemma's multiplies by 1 + w)
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6))
        scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        w = w + (1.0 if model.spec.rms_offset else 0.0)
    return cf * scale * w


def project(model, x_final: torch.Tensor, comps: torch.Tensor) -> torch.Tensor:
    """Direct-logit projection ``[..., n, V]`` of components ``comps [..., n, d]`` at ``x_final``."""
    W = model.unembed_weight.float()  # [V, d] (on the last device of a split model)
    return (frozen_final_norm(model, x_final, comps).to(W.device) @ W.T).to(x_final.device)


def parse_nodes(graph: Graph, nodes: Sequence[str]) -> list[tuple[str, int, int | None]]:
    """``[(name, layer, head or None for an MLP)]`` for head/MLP names of ``graph``."""
    out = []
    for n in nodes:
        graph.up_index(n)  # unknown names raise
        if n == "input":
            continue
        if n.startswith("m"):
            out.append((n, int(n[1:]), None))
        else:
            l, h = n[1:].split(".h")
            out.append((n, int(l), int(h)))
    return out


def token_groups(model, fact: Fact, n_tokens: int, extra: dict | None = None) -> dict[str, list[int]]:
    """Prompt positions of each token group (see the module doc); ``extra``: named position lists
    taken out of the other groups first (e.g. ``{"demos": [...]}``)."""
    ids = list(model.tokenizer(fact.prompt)["input_ids"])
    if len(ids) != n_tokens:
        raise FactscopeError(f"prompt of {fact.subject!r} has {len(ids)} tokens, expected {n_tokens}")
    special = set(model.tokenizer.all_special_ids or [])
    s, e = fact_subject_span(model.tokenizer, fact)
    taken = set()
    groups = {}
    for name, pos in (extra or {}).items():
        groups[name] = sorted(set(pos))
        taken |= set(pos)
    groups["subject"] = [p for p in range(s, e) if p not in taken]
    groups["last"] = [n_tokens - 1]
    groups["other"] = [p for p in range(n_tokens - 1) if ids[p] in special and p not in taken and not s <= p < e]
    used = taken | set(groups["subject"]) | set(groups["other"]) | {n_tokens - 1}
    groups["relation"] = [p for p in range(n_tokens) if p not in used]
    return groups


def measure_batch(model, batch, targets: torch.Tensor, nodes: Sequence[tuple[str, int, int | None]],
                  groups: Sequence[dict[str, list[int]]], answers: torch.Tensor | None = None,
                  top_k: int = 20, n_top: int = 8) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """One forward of a left-padded batch; per (prompt, node) a record, and per node the summed
    projection logits over the batch (``[V]``, for the node's top tokens over facts).

    ``targets``: long [B] first target tokens; ``answers``: long [A] the relation's answer tokens;
    ``groups[i]``: token groups of prompt i (prompt positions).
    """
    B, L = len(batch), model.n_layers
    targets = targets.to(model.device).long()
    layers = sorted({l for _, l, _ in nodes})
    with torch.no_grad(), hooks.cache(model, ["head_out", "mlp_out", "attn_probs"], layers) as c, \
            hooks.cache(model, ["resid_post"]) as cr:
        model.forward(batch, last_only=True)
    x_fin = cr["resid_post", L - 1][:, -1]  # [B, d]
    comps = torch.stack([c["mlp_out", l][:, -1] if h is None else c["head_out", l][:, -1, h]
                         for _, l, h in nodes], 1)  # [B, n, d]
    ans = answers.to(model.device).long() if answers is not None else torch.zeros(0, dtype=torch.long)
    sums = {n: torch.zeros(model.vocab_size) for n, _, _ in nodes}
    mlp_rank = {}
    with torch.no_grad():
        for l in {l for _, l, h in nodes if h is None}:
            after = cr["resid_post", l][:, -1]
            before = after - c["mlp_out", l][:, -1]
            mlp_rank[l] = (target_ranks(model.logit_lens(before), targets).cpu(),
                           target_ranks(model.logit_lens(after), targets).cpu())
    cols = [hooks.columns(batch, [g[k] for g in groups]) for k in groups[0]] if groups else []
    names = list(groups[0]) if groups else []
    records = []
    for i in range(B):
        with torch.no_grad():
            lg = project(model, x_fin[i], comps[i])  # [n, V]
        rk = target_ranks(lg, targets[i].expand(len(nodes)))
        top = lg.topk(max(top_k, n_top), dim=-1).indices
        other = ans[ans != targets[i]]
        hits = torch.isin(top[:, :top_k], other).sum(-1) if len(other) else torch.zeros(len(nodes), dtype=torch.long)
        for j, (name, l, h) in enumerate(nodes):
            sums[name] += lg[j].cpu()
            r = {"row": i, "node": name, "layer": l, "kind": "mlp" if h is None else "head",
                 "target_rank": int(rk[j]), "relation_hits": int(hits[j]),
                 "top_tokens": [int(t) for t in top[j, :n_top]]}
            if h is None:
                b, a = mlp_rank[l]
                r.update({"rank_before": int(b[i]), "rank_after": int(a[i]),
                          "gain_bits": math.log2(int(b[i]) + 1) - math.log2(int(a[i]) + 1)})
            else:
                row = c["attn_probs", l][i, h, -1].float()  # the last query's attention [T]
                for k, g in enumerate(names):
                    r[f"att_{g}"] = float(row[cols[k][i]].sum()) if cols[k][i] else 0.0
            records.append(r)
    return records, sums


def measure(model, facts: Sequence[Fact], nodes: Sequence[str], answers: Sequence[int] | None = None,
            top_k: int = 20, extra_groups: Sequence[dict] | None = None, batch_size: int = 8,
            progress: bool = False):
    """Per (fact, node) measurements (a DataFrame) and per node the mean projection logits ``[V]``.

    ``nodes``: head/MLP names (``a3.h1``, ``m5``); ``answers``: the relation's answer tokens (default:
    the first target tokens of ``facts``); ``extra_groups[i]``: extra token groups of fact i.
    """
    import pandas as pd

    from factscope.predict import length_batches

    if not facts:
        raise FactscopeError("no facts to measure node roles on")
    g = Graph.from_model(model)
    parsed = parse_nodes(g, nodes)
    if not parsed:
        raise FactscopeError("no head or MLP nodes to measure")
    tok = model.tokenizer
    seqs = [list(tok(f.prompt)["input_ids"]) for f in facts]
    tg = [target_ids(tok, f.prompt, f.target_true)[0] for f in facts]
    ans = torch.tensor(sorted(set(tg) if answers is None else set(int(a) for a in answers)), dtype=torch.long)
    groups = [token_groups(model, f, len(s), (extra_groups[i] if extra_groups else None))
              for i, (f, s) in enumerate(zip(facts, seqs))]
    rows, sums = [], {n: torch.zeros(model.vocab_size) for n, _, _ in parsed}
    bar = tqdm(total=len(facts), desc="node roles", disable=not progress, unit="fact")
    for idx in length_batches([len(s) for s in seqs], batch_size):
        recs, s = measure_batch(model, model.batch_from_ids([seqs[i] for i in idx]),
                                torch.tensor([tg[i] for i in idx]), parsed, [groups[i] for i in idx], ans, top_k)
        for r in recs:
            f = facts[idx[r.pop("row")]]
            r.update({"fact": f.id or f.subject, "subject": f.subject, "target": f.target_true})
            rows.append(r)
        for n in sums:
            sums[n] += s[n]
        bar.update(len(idx))
    bar.close()
    return pd.DataFrame(rows), {n: v / len(facts) for n, v in sums.items()}


def label(row: dict, rules: RoleRules) -> str:
    """The role of one node from its aggregated measurements (see the module doc); "" for none."""
    if row["kind"] == "mlp":
        return MLP_ROLE if row["gain_bits"] >= rules.mlp_gain_bits else ""
    s, r = row["att_subject"], row["att_relation"]
    writes_t = row["target_rank"] < rules.top_k
    writes_r = row["relation_hits"] >= rules.relation_hits
    if s >= rules.attn / 2 and r >= rules.attn / 2 and writes_t and writes_r:
        return "mixture"
    if s >= rules.attn and s >= r and writes_t:
        return "mover"
    if r >= rules.attn and r > s and writes_r:
        return "relation"
    return ""


def node_table(rows, mean_logits: dict, tokenizer, rules: RoleRules, n_top: int = 8):
    """Per node: attention shares (means), the target's median rank, the mean number of relation
    answers in its top ``top_k``, the MLP's median ranks and gain, its top tokens over the facts
    (of the mean projection), and its role."""
    import pandas as pd

    out = []
    for name, g in rows.groupby("node", sort=False):
        kind = g["kind"].iloc[0]
        r = {"node": name, "layer": int(g["layer"].iloc[0]), "kind": kind, "n_facts": len(g),
             "target_rank": float(g["target_rank"].median()),
             "target_top_share": float((g["target_rank"] < rules.top_k).mean()),
             "relation_hits": float(g["relation_hits"].mean())}
        if kind == "mlp":
            r.update({"rank_before": float(g["rank_before"].median()), "rank_after": float(g["rank_after"].median()),
                      "gain_bits": float(g["gain_bits"].median())})
        else:
            for col in [c for c in g.columns if c.startswith("att_")]:
                r[col] = float(g[col].mean())
        top = mean_logits[name].topk(n_top).indices.tolist()
        r["top_tokens"] = " | ".join(repr(tokenizer.decode([t]))[1:-1] for t in top)
        r["role"] = label(r, rules)
        out.append(r)
    df = pd.DataFrame(out)
    return df.sort_values(["layer", "kind", "node"]).reset_index(drop=True)


def circuit_nodes(graph: Graph) -> list[str]:
    """The heads and MLPs whose output the circuit uses (the upstream end of an edge in the graph).

    A grouped-query key/value receiver is shared by its query heads, so an edge into ``a8.kv0<v>``
    alone would make every head of layer 8 a node of :meth:`Graph.nodes_in_graph`; here a head
    counts only when its own output feeds the circuit."""
    used = (graph.in_graph & graph.real).any(1)
    return [n for i, n in enumerate(graph.up_names) if used[i] and n != "input"]


# --------------------------------------------------------------------------------------------
# Figure and run
# --------------------------------------------------------------------------------------------

ROLE_COLORS = {"mover": "#0072B2", "relation": "#D55E00", "mixture": "#CC79A7", "": "#bbbbbb",
               MLP_ROLE: "#E69F00"}


def plot_roles(table, title: str, top_k: int = 20):
    """Left: each head's attention from the last position to the subject (x) and the relation (y),
    coloured by role, size by how high it ranks the target (heads ranking it in their top ``top_k``
    are named). Right: each MLP's gain in the target's logit-lens rank at the last position (bits;
    1 = rank halved)."""
    from factscope.plotting import new_figure

    fig, (ax, bx) = new_figure(1, 2, size=(11, 4.2))
    heads = table[table["kind"] == "head"]
    for role, g in heads.groupby("role", sort=False):
        size = 12 + 60 / (1 + np.log10(1 + g["target_rank"].to_numpy()))
        ax.scatter(g["att_subject"], g["att_relation"], s=size, color=ROLE_COLORS.get(role, "#888888"),
                   label=role or "no role", alpha=0.85, edgecolor="white", lw=0.5)
        for _, r in g.iterrows():  # label heads with a role, and heads that write the target
            if role or r["target_rank"] < top_k:
                ax.annotate(r["node"], (r["att_subject"], r["att_relation"]), fontsize=6.5,
                            xytext=(3, 3), textcoords="offset points", color="#000000" if role else "#777777")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("attention from the last token to the subject")
    ax.set_ylabel("attention to the relation tokens")
    ax.set_title(f"{len(heads)} heads (larger: target ranked higher in the head's output;\n"
                 f"named: a role, or the target in its top {top_k})", fontsize=9)
    if len(heads):
        ax.legend(fontsize=7, loc="upper right")
    else:
        ax.text(0.5, 0.5, "no heads in the circuit", ha="center", va="center", transform=ax.transAxes, color="#777777")
    mlps = table[table["kind"] == "mlp"]
    if len(mlps):
        colors = [ROLE_COLORS.get(r, "#bbbbbb") for r in mlps["role"]]
        bx.bar(mlps["layer"], mlps["gain_bits"], color=colors)
        bx.axhline(0, color="#888888", lw=0.6)
    bx.set_xticks(sorted(set(int(x) for x in mlps["layer"])) if len(mlps) <= 20 else [])
    bx.set_xlabel("MLP layer")
    bx.set_ylabel("target rank gain at the last token (bits)")
    bx.set_title(f"{len(mlps)} MLPs (orange: raise the target's rank)", fontsize=10)
    fig.suptitle(title, fontsize=11)
    return fig


def roles_summary(table) -> dict:
    by = {role: table.loc[table["role"] == role, "node"].tolist() for role in (*HEAD_ROLES, MLP_ROLE)}
    return {"n_nodes": len(table), "n_heads": int((table["kind"] == "head").sum()),
            "n_mlps": int((table["kind"] == "mlp").sum()), **{k.replace(" ", "_"): v for k, v in by.items()}}


def run_roles(run, model, facts: Sequence[Fact], graph: Graph, dataset: str, answers: Sequence[int] | None = None,
              rules: RoleRules = RoleRules(), batch_size: int = 8, progress: bool = False, prefix: str = "roles",
              section: bool = True):
    """Measure the circuit's nodes on ``facts``; ``{prefix}.csv`` (per node), ``{prefix}_facts.csv``,
    ``{prefix}.png``, ``summary[prefix]``, a report section. Returns the node table."""
    nodes = circuit_nodes(graph)
    if not nodes:
        raise FactscopeError("the circuit has no head or MLP nodes")
    rows, mean_logits = measure(model, facts, nodes, answers, rules.top_k, batch_size=batch_size, progress=progress)
    table = node_table(rows, mean_logits, model.tokenizer, rules)
    run.save_table(f"{prefix}_facts", rows.assign(top_tokens=rows["top_tokens"].map(
        lambda ts: " | ".join(repr(model.tokenizer.decode([t]))[1:-1] for t in ts))))
    run.save_table(prefix, table)
    rel = dataset.split("/")[-1]
    run.save_figure(prefix, plot_roles(table, f"{model.name} · {rel} · node roles in the circuit ({len(facts)} facts)",
                                                 rules.top_k))
    s = roles_summary(table)
    s["rules"] = asdict(rules)
    run.update_summary({prefix: s})
    if section:
        def names(k):
            return ", ".join(s[k]) or "none"

        text = (
            f"The circuit's {s['n_heads']} heads and {s['n_mlps']} MLPs measured on {len(facts)} facts of "
            f"`{dataset}` ({model.weights}) at the last prompt position: each node's output projected to the "
            f"vocabulary (final norm with its scale frozen at the model's final residual, then the "
            f"unembedding), each head's attention from the last token, each MLP's change of the target's "
            f"logit-lens rank. Rules: a **mover** head attends to the subject (share >= {rules.attn}) and ranks "
            f"the target in its top {rules.top_k} (median over facts); a **relation** head attends to the "
            f"relation tokens (>= {rules.attn}) and has on average >= {rules.relation_hits} of the relation's "
            f"other answers in its top {rules.top_k}; a **mixture** head attends to both (>= {rules.attn / 2} "
            f"each) and writes both; a **target MLP** halves the target's rank or better (>= "
            f"{rules.mlp_gain_bits} bit, median).\n\n"
            f"- mover heads: {names('mover')}\n- relation heads: {names('relation')}\n"
            f"- mixture heads: {names('mixture')}\n- target MLPs: {names('target_MLP')}"
        )
        f, c = roles_findings(s)
        run.add_section(f"circuit_{prefix}", "Node roles in the circuit", text,
                        figures=[{"name": prefix, "caption": "heads by attention and role; MLPs by target-rank gain"}],
                        tables=[prefix], findings=f, claims=c)
    return table


def roles_findings(s: dict) -> tuple[list[str], list[Claim]]:
    """Findings and Yao et al.'s node-role claim from a roles summary (``summary["roles"]``). Rule:
    "the circuit holds mover and relation heads" holds when the rules find at least one of each, does
    not hold when they find neither, undecided with one kind only."""
    if not s.get("n_heads") and not s.get("n_mlps"):
        return [], []
    kinds = {"mover": "mover", "relation": "relation", "mixture": "mixture", "target_MLP": "target MLPs"}
    f = [f"Of the circuit's {s['n_heads']} heads and {s['n_mlps']} MLPs: "
         + "; ".join(f"{label} {len(s[k])}" + (f" ({', '.join(s[k][:4])}{', ...' if len(s[k]) > 4 else ''})"
                                               if s[k] else "") for k, label in kinds.items()) + "."]
    mover, relation = bool(s["mover"]), bool(s["relation"])
    claims = [Claim("The knowledge circuit holds mover heads and relation heads",
                    "GPT-2 medium: mover heads carry the subject to the last position, relation heads its relation",
                    f"{len(s['mover'])} mover, {len(s['relation'])} relation heads",
                    True if mover and relation else False if not (mover or relation) else None)]
    return f, claims


def analyse(model, dataset: str = "lre:factual/country_capital_city", *, graph=None, rules: RoleRules | None = None,
            limit: int | None = 40, seed: int = 0, known_only: bool = True, known_top_k: int = 10, out=None,
            progress: bool = True, **options):
    """``factscope circuit roles`` from Python (``factscope.circuits.roles(model, dataset)``): the roles
    of a circuit's nodes on the known facts of ``dataset``; ``graph``: a :class:`Graph` or the path of
    a graph JSON (default: discovered on the facts with ``options``, as :class:`factscope.circuits.run.Options`);
    ``rules``: :class:`RoleRules`. Returns a :class:`factscope.notebook.Result` (``table``: one row per node)."""
    from factscope.circuits.cases import circuit_graph, roles_on
    from factscope.circuits.run import from_python
    from factscope.notebook import as_model

    rules = (rules or RoleRules()).check()
    model = as_model(model)
    g = circuit_graph(graph, model) if graph is not None else None
    return from_python("roles", model, dataset,
                        lambda run, model, facts, table, opts: roles_on(run, model, facts, table, opts, dataset, rules,
                                                                        g, progress),
                        limit=limit, seed=seed, known_only=known_only, known_top_k=known_top_k, out=out,
                        progress=progress, options=options, key="roles", main="roles",
                        extra={"graph": None if graph is None or isinstance(graph, Graph) else str(graph),
                               "rules": asdict(rules)})


callable_module(__name__)  # factscope.circuits.roles(model, dataset) is analyse(model, dataset)
