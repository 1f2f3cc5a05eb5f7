"""The assistant-only loss: a token-weighted mean over trained tokens, whatever the batch split.

`assistant_loss_sum` runs the model and sums the cross-entropy of every trained target. Logits are
computed only where a target is trained (`logits_to_keep` as a boolean mask): projecting onto a 49k
vocabulary is a large share of a small model's compute, and user turns and headers need none of it.

`AssistantLossTrainer` divides that sum by `num_items_in_batch`, which the `Trainer` counts over every
micro-batch of one optimizer step (and, with `average_tokens_across_devices`, over every process). So a
step's loss is the mean over all its trained tokens: a conversation weighs by its tokens, not by which
micro-batch or GPU it landed in, and gradient accumulation gives the gradient of one big batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from bot.prompting import IGNORE_INDEX
from trainer.packing import LengthBucketSampler


def assistant_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropy over trained targets, number of trained targets) for one batch.

    `batch` holds `input_ids`, `labels` (unshifted: the label at i is the id at i) and `position_ids`.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE_INDEX
    count = keep.sum()
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
    outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
    logits = outputs.logits
    if logits.dim() == 2:  # the model honoured the mask: (trained targets, vocab)
        wanted = targets[keep[:, :-1]]
    else:  # a model that ignores a mask-shaped logits_to_keep returns every position
        logits = logits[:, :-1][keep[:, :-1]]
        wanted = targets[keep[:, :-1]]
    if wanted.numel() == 0:
        return logits.sum() * 0.0, count
    loss_sum = F.cross_entropy(logits.float(), wanted, reduction="sum")
    return loss_sum, count


class AssistantLossTrainer(Trainer):
    """A `Trainer` whose loss is the token-weighted mean over trained (assistant) tokens.

    Also counts the trained tokens it has processed (`trained_tokens`), for the progress bar.
    """

    # Our loss is already divided by the whole step's token count: no further division by GA steps.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Makes the Trainer count `num_items_in_batch` over the accumulated micro-batches (and devices).
        self.model_accepts_loss_kwargs = True
        self.trained_tokens = 0

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        """Packed rows (`PackedDataset`): length-bucketed batches in a random order, so little padding."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            return super()._get_train_sampler(train_dataset)
        return LengthBucketSampler(lengths, self.args.train_batch_size, seed=self.args.seed)

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        loss_sum, count = assistant_loss_sum(model, inputs)
        if model.training:
            self.trained_tokens += int(count)
        if num_items_in_batch is None:
            loss = loss_sum / count.clamp(min=1)
        else:
            total = num_items_in_batch
            if torch.is_tensor(total) and total.numel() > 1:  # DataParallel repeats it per GPU
                total = total.flatten()[0]
            loss = loss_sum / total
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                # DDP averages gradients over processes; the divisor already counts every process's tokens.
                loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss


@torch.no_grad()
def evaluate_loss(model: Any, batches: Any, device: torch.device | str) -> tuple[float, int]:
    """(token-weighted mean loss, trained tokens) over `batches` of collated rows, in eval mode."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    tokens = 0
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss_sum, count = assistant_loss_sum(model, batch)
            total += loss_sum.double().cpu()
            tokens += int(count)
    finally:
        model.train(was_training)
    return (float(total) / tokens if tokens else float("nan")), tokens
