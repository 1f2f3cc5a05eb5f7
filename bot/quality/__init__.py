"""`personabot eval`: a persona's replies to a question set, through the real path, scored.

- `questions`: the question set format and the shipped set (`questions.jsonl`);
- `run`: asking the questions through the worker in a scratch store, with fixed seeds;
- `scores`: accuracy, style, loop, language drift, name-prefix leak, length, distinct-2;
- `report`: the JSON and markdown report; `target`: which adapter version is evaluated.
"""
