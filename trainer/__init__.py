"""LoRA training of a persona with the assistant-only loss (`personabot train`, `personabot dataset check`).

- `data`: reading JSONL conversations and tutorial-format `<s>[INST] … [/INST] …</s>` lines;
- `examples`: rendering them through `bot.prompting` (the labels come from the renderer, nowhere else);
- `audit`: the mask audit run before any step;
- `split`, `prepare`: the seeded held-out split, and everything before the first step;
- `packing`: several conversations per row, each attending only to itself;
- `loss`: the token-weighted assistant loss and the `Trainer` that uses it;
- `samples`, `style`: replies to held-out prompts and the persona's automatic style check;
- `progress`: the progress bar and Ctrl-C; `report`: the loss curve and `report.md`;
- `hyper`: hyperparameters from `persona.toml` and the command line; `run`: one training run.
"""
