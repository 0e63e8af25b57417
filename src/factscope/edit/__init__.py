"""Knowledge editing: ROME and FT-M, CounterFact scores, lens and circuits before/after (docs/editing.md)."""
