"""Context hijacking (Jiang et al. 2024, "Do LLMs dream of elephants (when told not to)?", sec. 3).

Prepending factually harmless sentences ("Do not think of Guam.") before a factual prompt flips
the model's answer. ``run_benchmark`` measures the efficacy score ES(n) -- the share of facts with
P(target_false) > P(target_true) after n prepended sentences -- per scheme and model.

From Python: ``factscope.hijack.run(model, "counterfact-sample", max_prepends=5)`` returns a
:class:`factscope.notebook.Result` (``factscope hijack run`` as one call).
"""

from factscope.hijack.demo import demo_section
from factscope.hijack.runner import (
    HijackResult,
    ModelResult,
    Prepared,
    analyse as run,
    load_dataset,
    load_datasets,
    prepare,
    run_benchmark,
    run_model,
)
from factscope.hijack.schemes import (
    BUILTIN,
    GENERIC_TEMPLATE,
    Scheme,
    build_prompt,
    builtin_scheme,
    custom_scheme,
    negation_templates,
    parse_schemes,
    related_word,
    related_words,
    relation_sentence,
    scheme_sentence,
)
from factscope.hijack.scoring import Score, bootstrap_ci, efficacy_table, score_ids, score_prompts, tokenize

__all__ = [
    "BUILTIN", "GENERIC_TEMPLATE", "HijackResult", "ModelResult", "Prepared", "Scheme", "Score",
    "bootstrap_ci", "build_prompt", "builtin_scheme", "custom_scheme", "demo_section", "efficacy_table",
    "load_dataset", "load_datasets", "negation_templates", "parse_schemes", "prepare", "related_word", "related_words",
    "relation_sentence", "run", "run_benchmark", "run_model", "scheme_sentence", "score_ids", "score_prompts",
    "tokenize",
]
