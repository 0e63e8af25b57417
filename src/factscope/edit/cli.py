"""``factscope edit``: knowledge editing (ROME, FT-M) with CounterFact scores, lens and circuits."""

from __future__ import annotations

from pathlib import Path

import click

from factscope.commands import Common, analysis_options
from factscope.errors import FactscopeError


def _single_case(model, dataset: str, subject: str, target_new: str, prompt: str | None, target_true: str | None,
                 seed: int):
    """One case from --subject/--target-new: the prompt and true answer from the data set's fact about
    the subject when --prompt is not given, else the model's own top-1 continuation as the true answer."""
    from factscope.edit.scores import EditCase, check_case, load_cases
    from factscope.predict import top_k

    if prompt is None:
        found = [c for c in load_cases(dataset, seed=seed, subject=subject) if c.subject == subject]
        if not found:
            raise FactscopeError(f"no fact about {subject!r} in {dataset}; give --prompt with '{{}}' where the subject goes")
        c = found[0]
        return check_case(EditCase(c.case_id, subject, c.prompt, target_true or c.target_true, target_new,
                                    c.paraphrase_prompts, c.neighborhood, c.relation_id, c.subject_facts))
    if "{}" not in prompt:
        if subject not in prompt:
            raise FactscopeError(f"--prompt must contain '{{}}' or the subject {subject!r}")
        prompt = prompt.replace(subject, "{}", 1)
    if target_true is None:
        target_true = top_k(model, [prompt.replace("{}", subject, 1)], k=1)[0].tokens[0].strip()
    return check_case(EditCase("single", subject, prompt, target_true, target_new))


@click.command("edit")
@analysis_options("edit", without=("batch_size",), dataset="lre:factual", limit=50,
                  helps={"dataset": "CounterFact (counterfact, or a file in its schema) or any fact set (lre:..., known_1000, a file).",
                         "limit": "Edit this many cases (seeded sample)."})
@click.option("--method", type=click.Choice(["rome", "ft-m"]), default="rome", show_default=True,
              help="ROME (rank-one update of one MLP's down projection) or FT-M (fine-tune it on the target tokens).")
@click.option("--subject", default=None, help="Edit one fact: its subject (with --target-new).")
@click.option("--target-new", default=None, help="The new object for --subject.")
@click.option("--target-true", default=None, help="The true object for --subject (default: from the data set, or the model's top-1).")
@click.option("--prompt", default=None, help="Prompt for --subject, with '{}' where the subject goes.")
@click.option("--layer", type=int, default=None, help="Edited layer (default: per model, see docs/editing.md).")
@click.option("--cov-text", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="ROME: a text file (one paragraph per line) for the key covariance instead of the model's own generations.")
@click.option("--circuits", "circuit_cases", type=click.IntRange(0), default=3, show_default=True,
              help="Compare circuits before/after the edit on this many cases (EAP-IG).")
@click.option("--edges", "circuit_edges", type=click.IntRange(1), default=200, show_default=True,
              help="Circuit size (top edges by |EAP-IG score|).")
def edit(common: Common, **kw):
    """Edit facts with ROME or FT-M; score efficacy, paraphrase and neighbourhood; lens and circuits before/after."""
    from factscope.edit.run import make_editor, run_edit
    from factscope.edit.scores import load_cases

    if (kw["subject"] is None) != (kw["target_new"] is None):
        raise FactscopeError("--subject and --target-new go together")
    if kw["cov_text"] is not None and kw["method"] != "rome":
        raise FactscopeError("--cov-text is for --method rome")
    if kw["subject"] is None and (kw["prompt"] is not None or kw["target_true"] is not None):
        raise FactscopeError("--prompt and --target-true need --subject and --target-new")
    cov_texts = None
    if kw["cov_text"] is not None:
        cov_texts = [line for line in kw["cov_text"].read_text(encoding="utf-8").splitlines() if line.strip()]
        if not cov_texts:
            raise FactscopeError(f"--cov-text {kw['cov_text']} holds no text")
    model = common.load_model()
    if kw["subject"] is not None:
        cases = [_single_case(model, common.dataset, kw["subject"], kw["target_new"], kw["prompt"], kw["target_true"],
                              common.seed)]
    else:
        cases = load_cases(common.dataset, limit=common.limit, seed=common.seed)
    editor = make_editor(model, kw["method"], layer=kw["layer"], cov_texts=cov_texts, seed=common.seed)
    run = common.create_run(
        model, method=kw["method"], layer=editor.layer,
        single={k: kw[k] for k in ("subject", "target_new", "target_true", "prompt")} if kw["subject"] else None,
        cov_text=str(kw["cov_text"]) if kw["cov_text"] else None, circuits=kw["circuit_cases"],
        edges=kw["circuit_edges"], hparams=dict(editor.hp.__dict__))
    s = run_edit(run, model, editor, cases, kw["circuit_cases"], kw["circuit_edges"], progress=common.progress)
    run.write_report(title=f"Knowledge editing ({kw['method'].upper()}): {model.name}")
    pct = lambda x: "n/a" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    click.echo(f"{s.n} edits at layer {editor.layer}: efficacy {pct(s.efficacy)}, paraphrase {pct(s.paraphrase)}, "
               f"neighbourhood {pct(s.neighborhood)} (before: {pct(s.pre_efficacy)}, {pct(s.pre_paraphrase)}, "
               f"{pct(s.pre_neighborhood)}); same subject {pct(s.same_subject)} (before: {pct(s.pre_same_subject)})")
    click.echo(str(run.dir))
