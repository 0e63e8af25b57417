"""Hand-written mutation audit of the substrate (not a test module: pytest does not collect it).

Each mutant replaces one exact, unique piece of a source line with a wrong version; the script
applies it in place, runs the tiny-model tests of the mutated file (``-x``, ``-m "not realmodel"``,
one thread), records whether they fail (killed) or pass (survived), and restores the file (also on
Ctrl-C). Method and results: docs/testing.md.

    python tests/mutation_audit.py                        # every mutant, this tree's tests
    python tests/mutation_audit.py --tests /tmp/old/tests # the same mutants against other tests
    python tests/mutation_audit.py --group items [--whole-files] [--only I01,I04]
    python tests/mutation_audit.py --group devices        # off-CPU and split-model mistakes
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "factscope"

# Test files run for a mutant of each source file (the tiny-model tests of that layer).
TESTS = {
    "hooks.py": ["test_substrate.py"],
    "attention.py": ["test_substrate.py", "test_prefix.py"],
    "layout.py": ["test_runs.py"],
    "models.py": ["test_substrate.py", "test_models.py", "test_prefix.py"],
    "predict.py": ["test_substrate.py", "test_cli.py"],
    "facts.py": ["test_facts.py"],
    "runs.py": ["test_runs.py"],
    "report.py": ["test_runs.py", "test_report_browser.py"],
}

# (id, file, exact old text, new text, what is wrong)
AUDIT = [
    # ---- hooks.py
    ("H01", "hooks.py", "if not 0 <= layer < model.n_layers:", "if not 0 <= layer <= model.n_layers:", "layer range check off by one"),
    ("H02", "hooks.py", "return new.reshape(x.shape) if split else new", "return None", "edits of hook points dropped"),
    ("H03", "hooks.py", "keep = (lambda t: t.detach()) if detach else (lambda t: t)", "keep = (lambda t: t) if detach else (lambda t: t.detach())", "detach flag inverted"),
    ("H04", "hooks.py", "return torch.stack([self[k] for k in keys])", "return torch.stack([self[k] for k in keys[::-1]])", "stack in reverse layer order"),
    ("H05", "hooks.py", "orig = cur = heads * scale", "orig = cur = heads", "head_out without Gemma's post-norm factor"),
    ("H06", "hooks.py", "store[(\"attn_probs\", l)] = keep(rec[-1])", "store[(\"attn_probs\", l)] = keep(rec[0])", "probs of the first, not the last, forward"),
    ("H07", "hooks.py", "m[i, list(cols)] = True", "m[i, list(cols)[:1]] = True", "only the first listed column edited"),
    ("H08", "hooks.py", "return torch.where(m, new, x)", "return torch.where(m, x, new)", "positions inverted"),
    ("H09", "hooks.py", "new = values if mode == \"replace\" else x + values", "new = values if mode == \"replace\" else x - values", "add subtracts"),
    ("H10", "hooks.py", "out[l] = (x * ww).sum((0, 1)) / ww.sum((0, 1))", "out[l] = x.mean((0, 1))", "mean over padding too"),
    ("H11", "hooks.py", "point = {\"mlp\": \"mlp_out\", \"attn\": \"attn_out\", \"head\": \"z\"}[kind]", "point = {\"mlp\": \"attn_out\", \"attn\": \"mlp_out\", \"head\": \"z\"}[kind]", "mlp and attn swapped"),
    ("H12", "hooks.py", "bad = [h for h in heads if not 0 <= h < model.n_heads]", "bad = [h for h in heads if not 0 <= h <= model.n_heads]", "head range off by one"),
    ("H13", "hooks.py", "sel[heads] = True", "sel[:] = True", "every head ablated"),
    ("H14", "hooks.py", "cols.append(off + (p % n))", "cols.append(off + p)", "negative positions not wrapped"),
    ("H15", "hooks.py", "if not -n <= p < n:", "if not -n <= p <= n:", "position range off by one"),
    ("H16", "hooks.py", "m[i][torch.tensor(q_cols[i]).unsqueeze(1), torch.tensor(k_cols[i]).unsqueeze(0)] = True", "m[i][torch.tensor(k_cols[i]).unsqueeze(1), torch.tensor(q_cols[i]).unsqueeze(0)] = True", "edge mask transposed"),
    ("H17", "hooks.py", "m = m & sel.to(m.device).view(1, -1, 1, 1)", "m = m", "knockout heads ignored"),
    ("H18", "attention.py", "mask = mask.masked_fill(mask <= torch.finfo(mask.dtype).min, float(\"-inf\"))", "pass", "fully blocked query reads masked keys"),
    ("H19", "attention.py", "k = key.repeat_interleave(n_rep, dim=1) if n_rep > 1 else key", "k = key.repeat(1, n_rep, 1, 1) if n_rep > 1 else key", "recorded probs: wrong key head for GQA"),
    ("H20", "attention.py", "probs = torch.nan_to_num(torch.softmax(scores.float(), dim=-1), nan=0.0).to(query.dtype)", "probs = torch.nan_to_num(torch.softmax(scores.float() / 2, dim=-1), nan=0.0).to(query.dtype)", "recorded probs at the wrong temperature"),
    # ---- models.py
    ("M01", "models.py", "return [T - n for n in self.lengths]", "return [T - n - 1 for n in self.lengths]", "offset off by one"),
    ("M02", "models.py", "pos = (mask.cumsum(-1) - 1).clamp(min=0)", "pos = mask.cumsum(-1).clamp(min=0)", "positions start at 1"),
    ("M03", "models.py", "return self.unembed(out.last_hidden_state[:, -1].contiguous())", "return self.unembed(out.last_hidden_state[:, -2].contiguous())", "last_only reads the wrong position"),
    ("M04", "models.py", "w = w if self.spec.conv1d else w.T  # -> [n_heads*head_dim, d_model]", "w = w.T if self.spec.conv1d else w", "W_O transposed"),
    ("M05", "models.py", "return w.repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)", "return w.repeat(self.n_heads // self.n_kv_heads, 1, 1)", "W_V: wrong kv head per query head"),
    ("M06", "models.py", "return b.reshape(self.n_kv_heads, self.head_dim).repeat_interleave(self.n_heads // self.n_kv_heads, dim=0)", "return b.reshape(self.n_kv_heads, self.head_dim).repeat(self.n_heads // self.n_kv_heads, 1)", "b_V: wrong kv head per query head"),
    ("M07", "models.py", "w = norm.weight.float() + (1.0 if self.spec.rms_offset else 0.0)", "w = norm.weight.float()", "Gemma's (1 + w) dropped"),
    ("M08", "models.py", "if not prompts:\n            raise FactscopeError(\"no prompts given\")", "if prompts is None:\n            raise FactscopeError(\"no prompts given\")", "empty prompt list not caught"),
    ("M09", "models.py", "if p.stat().st_size != info[\"size\"] or _file_digest(p) != info[\"digest\"]:", "if p.stat().st_size != info[\"size\"] and _file_digest(p) != info[\"digest\"]:", "cache check needs both to differ"),
    ("M10", "models.py", "ids[i, T - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)", "ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)", "right padding of ids"),
    ("M11", "models.py", "\"float32\": torch.float32, \"bfloat16\": torch.bfloat16,", "\"float32\": torch.float32, \"bfloat16\": torch.float16,", "bfloat16 loads as float16"),
    # ---- predict.py
    ("P01", "predict.py", "if cur and (len(cur) >= batch_size or", "if cur and (len(cur) > batch_size or", "batches one too big"),
    ("P02", "predict.py", "(max_tokens and width * (len(cur) + 1) > max_tokens)", "(max_tokens and width * len(cur) > max_tokens)", "token budget off by one prompt"),
    ("P03", "predict.py", "for i, r in zip(idx, reduce(out, idx)):", "for i, r in zip(sorted(idx), reduce(out, idx)):", "results in the wrong order"),
    ("P04", "predict.py", "return (logits > logits.gather(1, tokens.view(-1, 1))).sum(-1)", "return (logits >= logits.gather(1, tokens.view(-1, 1))).sum(-1)", "rank counts the target itself"),
    ("P05", "predict.py", "\"known\": rank < top_k,", "\"known\": rank <= top_k,", "known = within top-(k+1)"),
    ("P06", "predict.py", "p, ix = lg.softmax(-1).topk(k, dim=-1)", "p, ix = lg.topk(k, dim=-1)", "top-k reports logits as probabilities"),
    ("P07", "predict.py", "first = [target_ids(model.tokenizer, f.prompt, f.target_true)[0] for f in facts]", "first = [target_ids(model.tokenizer, f.prompt, f.target_true)[-1] for f in facts]", "last target token instead of the first"),
    ("P08", "predict.py", "out = g.agg(n=\"size\", known=\"sum\", rate=\"mean\").reset_index()", "out = g.agg(n=\"size\", known=\"sum\", rate=\"sum\").reset_index()", "rate is a count"),
    # ---- facts.py
    ("F01", "facts.py", "return whole or starts", "return starts", "subject found inside another word"),
    ("F02", "facts.py", "if not special[i] and b > a and a < e and b > s", "if not special[i] and b > a and a <= e and b > s", "span takes the next token"),
    ("F03", "facts.py", "            s = occ[-1]\n", "            s = occ[0]\n", "'last' picks the first occurrence"),
    ("F04", "facts.py", "if not prompt or prompt[-1].isspace() or target[0].isspace() or target[0] in _ATTACHING:", "if not prompt or prompt[-1].isspace() or target[0].isspace():", "space before attaching punctuation"),
    ("F05", "facts.py", "cands = [o for o in pools[f.relation_id] if o.casefold() != own]", "cands = [o for o in pools[f.relation_id] if o != f.target_true]", "false target may equal the true one up to case"),
    ("F06", "facts.py", "keep = sorted(random.Random(seed).sample(range(len(facts)), limit))", "keep = random.Random(seed).sample(range(len(facts)), limit)", "limited subset not in data-set order"),
    ("F07", "facts.py", "pos = torch.arange(n - 1, n - 1 + len(t_ids), device=device)", "pos = torch.arange(n, n + len(t_ids), device=device)", "target log-prob read one position late"),
    ("F08", "facts.py", "ok = isinstance(data, list) and data and \"requested_rewrite\" in data[0]", "ok = isinstance(data, list)", "any JSON list accepted as CounterFact"),
    ("F09", "facts.py", "return _LITERAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), s)", "return _LITERAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 10)), s)", "escapes decoded as decimal"),
    ("F10", "facts.py", "while start < end - 1 and not tokenizer.decode([full[start]]).strip():", "while False:", "prefix fallback keeps a lone space token"),
    # ---- runs.py
    ("R01", "runs.py", "elif old_d[key] != new_d[key]:", "elif False:", "changed config values not compared"),
    ("R02", "layout.py", "NON_DEFINING_KEYS = frozenset({\"versions\", \"created_utc\", \"resumed_utc\", \"runtime\", \"out\", \"resume\"})", "NON_DEFINING_KEYS = frozenset({\"versions\", \"created_utc\", \"resumed_utc\", \"out\", \"resume\"})", "runtime settings block a resume"),
    ("R03", "runs.py", "                        break  # killed mid-write", "                        pass  # killed mid-write", "torn last line is an error"),
    ("R04", "runs.py", "                    if nl < 0:\n                        raise ValueError(\"no newline at the end\")\n", "", "unterminated last line accepted"),
    ("R05", "runs.py", "return [k for k in keys if k not in self]", "return [k for k in keys if k in self]", "pending returns the done keys"),
    ("R06", "runs.py", "os.chmod(tmp, 0o666 & ~umask)", "pass", "results left with mode 0600"),
    ("R07", "runs.py", "merged = self.summary\n", "merged = {}\n", "summary overwritten, not merged"),
    ("R08", "runs.py", "                old[\"runtime\"] = new[\"runtime\"]", "                pass", "resume keeps the old runtime settings"),
    ("R09", "runs.py", "reserved = {\"versions\", \"created_utc\", \"resumed_utc\"} & set(new)", "reserved = set()", "reserved config keys accepted"),
    ("R10", "runs.py", "and df.index.step == 1", "and df.index.step == 2", "a plain index saved as a column"),
    # ---- report.py
    ("E01", "report.py", "return html.escape(str(value), quote=True)", "return html.escape(str(value), quote=False)", "quotes not escaped in attributes"),
    ("E02", "report.py", "decimals = max(0, digits - 1 - int(math.floor(math.log10(a))))", "decimals = max(0, digits - int(math.floor(math.log10(a))))", "one digit too many"),
    ("E03", "report.py", "    if n > max_rows:\n", "    if n >= max_rows:\n", "'first 30 of 30 rows' note"),
    ("E04", "report.py", "if len(s) > MAX_CELL_CHARS:", "if len(s) > 10 * MAX_CELL_CHARS:", "long cells not shortened"),
    ("E05", "report.py", "short = [(k, v) for k, v in scalars if len(format_value(v)) <= 24]", "short = [(k, v) for k, v in scalars if len(format_value(v)) <= 400]", "long values squeezed into cards"),
    ("E06", "report.py", "return sum(1 for line in f if line.endswith(b\"\\n\") and line.strip())", "return sum(1 for line in f if line.strip())", "torn checkpoint line counted"),
    ("E07", "report.py", "        while anchor in used_ids:\n", "        if anchor in used_ids:\n", "third section with one key reuses an anchor"),
    ("E08", "report.py", "f\"<figcaption>{esc(cap)}{", "f\"<figcaption>{cap}{", "figure caption not escaped"),
    ("E09", "report.py", "return '<dl class=\"kv\">' + \"\".join(f\"<dt>{esc(a)}</dt><dd>{esc(b)}</dd>\" for a, b in rows) + \"</dl>\"", "return '<dl class=\"kv\">' + \"\".join(f\"<dt>{a}</dt><dd>{b}</dd>\" for a, b in rows) + \"</dl>\"", "files block not escaped"),
    ("E10", "report.py", "f'<div class=\"v\">{esc(format_value(v))}</div></div>'", "f'<div class=\"v\">{format_value(v)}</div></div>'", "summary card values not escaped"),
    # ---- shared prefixes and the vocabulary pass (issue 10, hijack >= 10x)
    ("S01", "models.py", "better = mx > best", "better = mx >= best", "top-1 takes the last of tied maxima"),
    ("S02", "models.py", "lse = torch.logaddexp(lse, c)", "lse = torch.maximum(lse, c)", "normaliser of the largest chunk only"),
    ("S03", "models.py", "return Prefix(k, v, lengths, starts=[off[r] - lo for r in rows])", "return Prefix(k, v, lengths)", "taken rows read as left-padded"),
    ("S04", "models.py", "cols = list(range(o, o + a)) + list(range(P + S - b, P + S))", "cols = list(range(P - a, P)) + list(range(P + S - b, P + S))", "extend assumes a left-padded prefix"),
    ("S05", "attention.py", "        if module._fs_halt:", "        if False:", "prefill runs the whole last layer"),
    ("S06", "hooks.py", "    def halt(x, l):\n        raise Halt\n", "    def halt(x, l):\n        return None\n", "stop_after runs the layers above"),
]

# Written after the tests for AUDIT's survivors, and run once against them (a held-out check of
# the new tests; survivors are listed in docs/testing.md).
HOLDOUT = [
    ("X01", "hooks.py", "return x[0] if isinstance(x, tuple) else x", "return x[0] if isinstance(x, list) else x", "tuple outputs not unpacked"),
    ("X02", "hooks.py", "return (new, *args[1:]), kwargs", "return (new,), kwargs", "resid_pre edit drops the layer's other arguments"),
    ("X03", "hooks.py", "repl = target.expand_as(x) if target.dim() else torch.zeros_like(x)", "repl = target.expand_as(x) if target.dim() else torch.ones_like(x)", "zero head ablation writes ones"),
    ("X04", "hooks.py", "m = m.unsqueeze(1)  # [B, 1, T, T]", "m = m.unsqueeze(0)", "per-prompt masks on the head axis"),
    ("X05", "hooks.py", "with edit(model, \"resid_pre\", layer, lambda x, l: resid_pre.to(x.dtype)):", "with edit(model, \"resid_pre\", layer, lambda x, l: x):", "start_at ignores the cached stream"),
    ("X06", "attention.py", "if softcap is None and blocks:", "if softcap is None and len(blocks or ()) > 1:", "a single knockout ignored"),
    ("X07", "hooks.py", "new = fn(x.view(*x.shape[:-1], H, hd) if split else x)", "new = fn(x.view(*x.shape[:-1], hd, H).transpose(-1, -2) if split else x)", "per-head points split the wrong way"),
    ("X08", "models.py", "return Batch(r(self.input_ids), r(self.attention_mask), r(self.position_ids), [x for x in self.lengths for _ in range(n)])", "return Batch(r(self.input_ids), r(self.attention_mask), r(self.position_ids), self.lengths * n)", "repeat: lengths in the wrong order"),
    ("X09", "models.py", "w = proj.weight[:, 2 * self.d_model : 3 * self.d_model]  # c_attn = [q | k | v]", "w = proj.weight[:, self.d_model : 2 * self.d_model]", "GPT-2 W_V reads the keys"),
    ("X10", "models.py", "return (torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype)", "return (torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps) * w).to(x.dtype)", "RMS over a sum"),
    ("X11", "models.py", "    hf.set_attn_implementation(attention.ATTN_NAME)\n", "", "factscope attention never installed"),
    ("X12", "predict.py", "Prediction(ix[j].tolist(), model.to_str_tokens(ix[j].tolist()), p[j].tolist())", "Prediction(ix[j].tolist(), model.to_str_tokens(ix[j].tolist()), p[0].tolist())", "every prompt gets the first prompt's probabilities"),
    ("X13", "predict.py", "prob = lg.softmax(-1).gather(1, tgt[:, None])[:, 0]", "prob = lg.gather(1, tgt[:, None])[:, 0]", "target logit reported as probability"),
    ("X14", "predict.py", "return out.sort_values([\"rate\", \"n\"], ascending=False).reset_index(drop=True)", "return out.sort_values([\"rate\", \"n\"], ascending=True).reset_index(drop=True)", "relations sorted worst first"),
    ("X15", "facts.py", "if prompt[occurrence : occurrence + len(subject)] != subject:", "if prompt[occurrence : occurrence + len(subject)] == subject:", "offset check inverted"),
    ("X16", "facts.py", "if not prompt or prompt[-1].isspace() or target[0].isspace() or target[0] in _ATTACHING:", "if not prompt or target[0].isspace() or target[0] in _ATTACHING:", "space added after a prompt's trailing space"),
    ("X17", "facts.py", "        if limit < 0:\n", "        if limit < -1:\n", "limit -1 not refused"),
    ("X18", "facts.py", "for alias in (\"object\", \"attribute\", \"target\"):", "for alias in (\"object\", \"attribute\"):", "'target' column not accepted"),
    ("X19", "facts.py", "cut = offs[rest[0]][0] if rest else len(text)", "cut = offs[rest[0]][1] if rest else len(text)", "merged-token text cut too late"),
    ("X20", "runs.py", "if r[\"key\"] == key:", "if r[\"key\"] != key:", "get returns another record"),
    ("X21", "runs.py", "nonempty = out.is_dir() and any(out.iterdir())", "nonempty = out.is_dir()", "an empty directory refused"),
    ("X22", "runs.py", "return sorted(p.stem for p in self.dir.glob(\"*.csv\") if not p.name.startswith(_TMP_PREFIX))", "return sorted(p.stem for p in self.dir.glob(\"*.csv\"))", "temp files listed as tables"),
    ("X23", "runs.py", "            f.flush()\n            os.fsync(f.fileno())\n", "            f.flush()\n", "atomic write without fsync"),
    ("X24", "report.py", "return \"∞\" if v > 0 else \"−∞\"", "return \"−∞\" if v > 0 else \"∞\"", "infinities with the wrong sign"),
    ("X25", "report.py", "parts.append(\"<p>\" + \"<br>\\n\".join(_inline(ln.strip()) for ln in lines[i:j]) + \"</p>\")", "parts.append(\"<p>\" + \" \".join(_inline(ln.strip()) for ln in lines[i:j]) + \"</p>\")", "line breaks in a paragraph dropped"),
    ("X26", "report.py", "        if key not in NON_DEFINING_KEYS:\n            rows.append((key, cfg.pop(key)))", "        if key in NON_DEFINING_KEYS:\n            rows.append((key, cfg.pop(key)))", "config rows in the wrong order"),
    ("X27", "report.py", "        title += f\" — {model}\"", "        pass", "model missing from the title"),
]

# The weaknesses issue 9 names, each with the test written for it (-k) in the file that runs.
ITEMS = [
    ("I01", "hooks.py", "with edit(model, point, layer, lambda x, l: _mix(x, values, positions, mode)):", "with edit(model, point, layer, lambda x, l: None):", "patch does nothing", "test_substrate.py", "patch"),
    ("I02", "hooks.py", "new = values if mode == \"replace\" else x + values", "new = values", "add replaces", "test_substrate.py", "patch"),
    ("I03", "hooks.py", "return None if new is None else _replace_first(out, new)", "return None if new is None or point == \"resid_post\" else _replace_first(out, new)", "resid_post edits dropped", "test_substrate.py", "patch"),
    ("I04", "hooks.py", "out[l] = (x * ww).sum((0, 1)) / ww.sum((0, 1))", "out[l] = x.mean((0, 1))", "mean over padding too", "test_substrate.py", "mean"),
    ("I05", "hooks.py", "out[l] = (x * ww).sum((0, 1)) / ww.sum((0, 1))", "out[l] = (x * ww).sum((0, 1)) / x.shape[0] / x.shape[1]", "sum over real tokens / all tokens", "test_substrate.py", "mean"),
    ("I06", "hooks.py", "sel[heads] = True", "sel[:] = True", "every head ablated", "test_substrate.py", "mean"),
    ("I07", "hooks.py", "pm = _position_mask(positions, x)", "pm = _position_mask(None, x)", "head ablation ignores positions", "test_substrate.py", "mean"),
    ("I08", "hooks.py", "return _mix(x, target.expand_as(x[0, 0]) if target.dim() else target.expand_as(x), positions, \"replace\")", "return _mix(x, target.expand_as(x[0, 0]) if target.dim() else target.expand_as(x), None, \"replace\")", "mlp/attn ablation ignores positions", "test_substrate.py", "mean"),
    ("I09", "hooks.py", "repl = target.expand_as(x) if target.dim() else torch.zeros_like(x)", "repl = torch.zeros_like(x)", "head mean ablation zeroes", "test_substrate.py", "mean"),
    ("I10", "hooks.py", "k = key.repeat_interleave(n_rep, dim=1) if n_rep > 1 else key", "k = key.repeat(1, n_rep, 1, 1) if n_rep > 1 else key", "recorded probs: wrong key head (GQA)", "test_substrate.py", "attention_probabilities or sliding or knockout_single"),
    ("I11", "hooks.py", "probs = torch.nan_to_num(torch.softmax(scores.float(), dim=-1), nan=0.0).to(query.dtype)", "probs = torch.nan_to_num(torch.softmax(scores.float() / 2, dim=-1), nan=0.0).to(query.dtype)", "recorded probs at the wrong temperature", "test_substrate.py", "attention_probabilities or sliding or knockout"),
    ("I18", "hooks.py", "    if mask is not None:\n        scores = scores + mask\n", "    if mask is not None and module.layer_idx < 2:\n        scores = scores + mask\n", "recorded probs unmasked from layer 2 on (outputs intact)", "test_substrate.py", "attention_probabilities or sliding or knockout or weights"),
    ("I12", "report.py", "f\"<figcaption>{esc(cap)}", "f\"<figcaption>{cap}", "figure caption not escaped", "test_runs.py", "report"),
    ("I13", "report.py", "parts.append(f\"<h3>{esc(tab['caption'])}</h3>\")", "parts.append(f\"<h3>{tab['caption']}</h3>\")", "table caption not escaped", "test_runs.py", "report"),
    ("I14", "report.py", "f'<div class=\"v\">{esc(format_value(v))}</div></div>'", "f'<div class=\"v\">{format_value(v)}</div></div>'", "summary card values not escaped", "test_runs.py", "report"),
    ("I15", "report.py", "<dd>{esc(format_value(v, 400))}</dd>'", "<dd>{format_value(v, 400)}</dd>'", "long summary values not escaped", "test_runs.py", "report"),
    ("I16", "report.py", "return '<dl class=\"kv\">' + \"\".join(f\"<dt>{esc(a)}</dt><dd>{esc(b)}</dd>\" for a, b in rows) + \"</dl>\"", "return '<dl class=\"kv\">' + \"\".join(f\"<dt>{a}</dt><dd>{b}</dd>\" for a, b in rows) + \"</dl>\"", "files block not escaped", "test_runs.py", "report"),
    ("I17", "report.py", "return sum(1 for line in f if line.endswith(b\"\\n\") and line.strip())", "return sum(1 for line in f if line.strip())", "torn checkpoint line counted", "test_runs.py", "report"),
]

# Devices (issue 14): mistakes that only show off the CPU or on a model split over devices, each
# against tests/test_devices.py (simulated devices, see tests/simdevice.py).
DEVICES = [
    ("D01", "predict.py", "tgt = torch.tensor([first[i] for i in idx], device=lg.device)", "tgt = torch.tensor([first[i] for i in idx])", "known-facts targets made on the CPU", "test_devices.py", None),
    ("D02", "hooks.py", "return None if detach else store[key]", "return None", "gradients miss a split model's recorded copies", "test_devices.py", None),
    ("D03", "models.py", "new = fn(x.to(model.device))", "new = fn(x)", "hooks see a split model's activations on their layer's device", "test_devices.py", None),
    ("D04", "models.py", "masks[self.attn_window(l)].to(dev))", "masks[self.attn_window(l)])", "shared-prefix masks left on the first device", "test_devices.py", None),
    ("D05", "circuits/roles.py", "return (frozen_final_norm(model, x_final, comps).to(W.device) @ W.T).to(x_final.device)", "return frozen_final_norm(model, x_final, comps) @ W.T", "role projections meet the unembedding on another device", "test_devices.py", None),
    ("D06", "models.py", "dm[spec.lm_head] = str(devices[0] if tied else devices[-1])", "dm[spec.lm_head] = str(devices[-1])", "a tied unembedding placed away from its matrix", "test_devices.py", None),
    ("D07", "hooks.py", "m = m.to(model.layer_device(l))", "m = m.to(model.device)", "knockout masks left on the first device", "test_devices.py", None),
    ("D08", "models.py", "flat, idx = x.to(w.device, w.dtype), ids.to(w.device)", "flat, idx = x.to(w.dtype), ids.to(w.device)", "vocabulary pass on the wrong device", "test_devices.py", None),
    ("D09", "models.py", "    if new is None and home._version != version:\n        new = home\n", "", "in-place hook edits lost on a split model's other devices", "test_devices.py", None),
    ("D10", "models.py", "d, left, load = d + 1, left - load, 0", "d, load = d + 1, 0", "layers not balanced over the devices after a large first part", "test_devices.py", None),
]


def run_tests(test_dir: Path, files: list[str], k: str | None, timeout: int) -> tuple[str, float]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not realmodel"]
    if k:
        cmd += ["-k", k]
    cmd += [str(test_dir / f) for f in files if (test_dir / f).exists()]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    t = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return "killed (timeout)", time.time() - t
    if proc.returncode == 0:
        return "survived", time.time() - t
    if proc.returncode == 1:
        failed = [ln.split("::")[-1].split(" ")[0] for ln in proc.stdout.splitlines() if ln.startswith("FAILED")]
        return "killed" + (f" ({failed[0]})" if failed else ""), time.time() - t
    if proc.returncode == 5:
        return "no tests ran", time.time() - t
    return f"killed (pytest exit {proc.returncode})", time.time() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tests", type=Path, default=ROOT / "tests")
    ap.add_argument("--group", choices=["audit", "holdout", "items", "devices"], default="audit")
    ap.add_argument("--only", default="")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--whole-files", action="store_true", help="items: run the whole test file, not only the item's tests")
    ap.add_argument("--suite", action="store_true", help="run every tiny-model test file, not only the mutated file's")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))  # restore the file on kill
    only = set(filter(None, args.only.split(",")))
    rows = {"audit": AUDIT, "holdout": HOLDOUT, "items": ITEMS, "devices": DEVICES}[args.group]
    killed = total = 0
    print("| id | file | mutation | result | s |\n|---|---|---|---|---|", flush=True)
    for row in rows:
        mid, fname, old, new, what = row[:5]
        if only and mid not in only:
            continue
        path = SRC / fname
        original = path.read_text()
        if original.count(old) != 1:
            print(f"| {mid} | {fname} | {what} | NOT APPLIED ({original.count(old)} matches) | |", flush=True)
            continue
        files, k = (TESTS[fname], None) if len(row) == 5 else ([row[5]], None if args.whole_files else row[6])
        if args.suite:
            files = sorted(p.name for p in args.tests.glob("test_*.py") if p.name != "test_report_browser.py")
        try:
            path.write_text(original.replace(old, new))
            result, secs = run_tests(args.tests, files, k, args.timeout)
        finally:
            path.write_text(original)
        total += result != "no tests ran"
        killed += result.startswith("killed")
        print(f"| {mid} | {fname} | {what} | {result} | {secs:.0f} |", flush=True)
    print(f"\nkilled {killed} of {total} ({100 * killed / max(total, 1):.0f}%)", flush=True)


if __name__ == "__main__":
    main()
