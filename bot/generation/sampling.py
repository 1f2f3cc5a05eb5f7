"""Choosing the next token of every row of a batch, each row with its own persona's sampling settings.

The order of operations is the one `transformers.generate` uses: repetition penalty on the raw logits,
then temperature, top-k, top-p. Temperature 0 is greedy (argmax after the penalty). Each row draws from
its own `torch.Generator`, so a seeded request samples the same reply whatever batch it lands in.

The nucleus is found among the 64 most likely tokens when they already hold `top_p` of the mass (the
usual case); only rows whose nucleus is wider sort the whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from personas.spec import Sampling

_CANDIDATES = 64


class BatchSampler:
    def __init__(
        self,
        settings: Sequence[Sampling],
        seeds: Sequence[int | None],
        prompts: Sequence[Sequence[int]],
        vocab_size: int,
        device: torch.device,
    ) -> None:
        rows = len(settings)
        self.device = device
        self.temperature = [s.temperature for s in settings]
        self.top_p = [s.top_p for s in settings]
        self.top_k = [s.top_k for s in settings]
        self.penalty = torch.tensor([[s.repetition_penalty] for s in settings], device=device)
        self.use_penalty = any(s.repetition_penalty != 1.0 for s in settings)
        self.generators = []
        for seed in seeds:
            g = torch.Generator(device=device)
            g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item()))
            self.generators.append(g)
        # Tokens each row has seen (prompt and reply so far), for the repetition penalty.
        self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)
        if self.use_penalty:
            for row, ids in enumerate(prompts):
                if ids:
                    self.seen[row, torch.tensor(list(ids), device=device).clamp_(0, vocab_size - 1)] = True
        self.rows = list(range(rows))  # original row of each current batch row

    def keep_rows(self, index: list[int]) -> None:
        """The batch was compacted: current row i is the old current row index[i]."""
        self.rows = [self.rows[i] for i in index]
        self.seen = self.seen[torch.tensor(index, device=self.device)]
        self.penalty = self.penalty[torch.tensor(index, device=self.device)]

    def observe(self, tokens: torch.Tensor) -> None:
        if self.use_penalty:
            self.seen.scatter_(1, tokens.view(-1, 1), True)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token of every current row, from `logits` `[rows, vocab]` (float32)."""
        logits = logits.float()
        vocab = logits.shape[-1]
        if self.seen.shape[1] < vocab:  # a model whose head is wider than the tokenizer
            pad = torch.zeros(
                self.seen.shape[0], vocab - self.seen.shape[1], dtype=torch.bool, device=self.device
            )
            self.seen = torch.cat([self.seen, pad], dim=1)
        if self.use_penalty:
            seen = self.seen[:, :vocab]
            penalized = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
            logits = torch.where(seen, penalized, logits)
        chosen = logits.argmax(dim=-1)
        sampled = [i for i, row in enumerate(self.rows) if self.temperature[row] > 0]
        if sampled:
            index = torch.tensor(sampled, device=self.device)
            picks = self._sample(logits.index_select(0, index), [self.rows[i] for i in sampled])
            chosen = chosen.index_copy(0, index, picks)
        return chosen

    def _sample(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        temperature = torch.tensor([[self.temperature[r]] for r in rows], device=self.device)
        logits = logits / temperature
        cap = min(_CANDIDATES, logits.shape[-1])
        top_values, top_index = logits.topk(cap, dim=-1)
        picks = []
        for i, row in enumerate(rows):
            values, index = top_values[i], top_index[i]
            k = self.top_k[row]
            # log of the mass top-p is measured against: the top-k set, or the whole vocabulary.
            lse = torch.logsumexp(values[:k] if 0 < k <= cap else logits[i], dim=-1)
            if not (0 < k <= cap) and not self._nucleus_within(values, lse, row):
                values, index = logits[i].sort(descending=True)
                lse = torch.logsumexp(values[:k] if k > 0 else values, dim=-1)
            picks.append(index[self._pick(values, lse, row)])
        return torch.stack(picks)

    def _nucleus_within(self, top_values: torch.Tensor, lse: torch.Tensor, row: int) -> bool:
        if self.top_k[row] > 0 or self.top_p[row] >= 1.0:
            return False  # a top-k wider than the candidates, or no nucleus: use the whole vocabulary
        return float(torch.exp(top_values - lse).sum()) >= self.top_p[row]

    def _pick(self, sorted_values: torch.Tensor, lse: torch.Tensor, row: int) -> torch.Tensor:
        """Sample an index into `sorted_values` (descending) after top-k and top-p."""
        k = self.top_k[row]
        values = sorted_values[:k] if k > 0 else sorted_values
        probs = torch.exp(values - lse)
        top_p = self.top_p[row]
        if top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (always at least one token), as
            # transformers' TopPLogitsWarper does.
            before = probs.cumsum(dim=-1) - probs
            keep = max(int((before < top_p).sum()), 1)
            probs = probs[:keep]
        return torch.multinomial(probs, 1, generator=self.generators[row])[0]
