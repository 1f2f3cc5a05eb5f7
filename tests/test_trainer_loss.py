"""The assistant-only loss is a token-weighted mean, whatever the batch and accumulation split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from bot.prompting import ChatRenderer, Turn
from tests.tiny import byte_level_tokenizer, tiny_llama
from trainer.loss import AssistantLossTrainer, assistant_loss_sum, evaluate_loss
from trainer.packing import PackedCollator, PackedDataset, unpacked

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

# Rows with very different numbers of trained tokens: a mean of per-row means would weigh them wrongly.
CONVERSATIONS = [
    [Turn("user", "hello world"), Turn("assistant", "Aye.")],
    [
        Turn("user", "What's the capital of Germany?"),
        Turn("assistant", "The capital of Germany is Berlin, matey, and ye be welcome there any day."),
        Turn("user", "What about France?"),
        Turn(
            "assistant", "The capital of France is Paris. Arr, the quick brown fox jumps over the lazy dog."
        ),
    ],
    [Turn("user", "Soft rain on the roof"), Turn("assistant", "the kettle begins to sing")],
    [
        Turn("user", "Python functions"),
        Turn("assistant", "loops, lists and dictionaries make programs readable."),
    ],
]


@pytest.fixture(scope="module")
def rows() -> list:
    renderer = ChatRenderer(byte_level_tokenizer(), "chatml")
    examples = []
    for turns in CONVERSATIONS:
        ex = renderer.render_training(turns, system="Be brief.")
        examples.append((ex.input_ids, ex.labels))
    return unpacked(examples)


def _lora_model() -> Any:
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(byte_level_tokenizer(), seed=3)
    model.config.use_cache = False
    # Random B (not zeros) so every LoRA matrix gets a gradient on the first step.
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(0)
    config.init_lora_weights = False
    return get_peft_model(model, config)


class _Grab(TrainerCallback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
    ) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _trainer_grads(
    rows: list, tmp_path: Path, batch: int, accum: int
) -> tuple[dict[str, torch.Tensor], float]:
    model = _lora_model()
    args = TrainingArguments(
        output_dir=str(tmp_path / f"b{batch}a{accum}"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_steps=1,
        learning_rate=1e-3,
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        remove_unused_columns=False,
    )
    grab = _Grab()
    trainer = AssistantLossTrainer(
        model=model,
        args=args,
        train_dataset=PackedDataset(rows),
        data_collator=PackedCollator(pad_token_id=0),
        callbacks=[grab],
    )
    trainer.train()
    loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    assert trainer.trained_tokens == sum(sum(1 for v in r.labels if v != -100) for r in rows)
    return grab.grads, loss


def _reference(rows: list, token_weighted: bool) -> tuple[dict[str, torch.Tensor], float]:
    """Gradient of one big batch: the token-weighted mean, or (wrongly) the mean of per-row means."""
    model = _lora_model()
    model.train()
    collate = PackedCollator(pad_token_id=0)
    if token_weighted:
        total, count = assistant_loss_sum(model, collate(rows))
        loss = total / count
    else:
        parts = [assistant_loss_sum(model, collate([r])) for r in rows]
        loss = sum(t / c for t, c in parts) / len(parts)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}, float(
        loss.detach()
    )


def test_accumulation_and_batch_splits_give_the_big_batch_gradient(rows: list, tmp_path: Path) -> None:
    expected, expected_loss = _reference(rows, token_weighted=True)
    assert expected and all(g.abs().sum() > 0 for g in expected.values())
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        grads, loss = _trainer_grads(rows, tmp_path, batch, accum)
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-6), (batch, accum, name)
        assert loss == pytest.approx(expected_loss, rel=1e-4)


def test_a_mean_of_micro_batch_means_would_differ(rows: list) -> None:
    """The check above can fail: weighting rows equally changes the gradient on this data."""
    right, _ = _reference(rows, token_weighted=True)
    wrong, _ = _reference(rows, token_weighted=False)
    assert any(not torch.allclose(right[n], wrong[n], rtol=1e-3, atol=1e-6) for n in right)


def test_logits_are_computed_only_where_a_token_is_trained(rows: list) -> None:
    model = _lora_model()
    batch = PackedCollator(pad_token_id=0)(rows)
    seen: list[tuple[int, ...]] = []
    hook = model.get_base_model().lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    try:
        with torch.no_grad():
            _, count = assistant_loss_sum(model, batch)
    finally:
        hook.remove()
    assert seen == [(int(count), model.config.vocab_size)]
    assert int(count) < batch["input_ids"].numel() // 2


def test_evaluate_loss_is_token_weighted_and_restores_training_mode(rows: list) -> None:
    model = _lora_model()
    model.train()
    collate = PackedCollator(pad_token_id=0)
    loss, tokens = evaluate_loss(model, [collate(rows[:1]), collate(rows[1:])], "cpu")
    assert model.training
    model.eval()
    with torch.no_grad():
        total, count = assistant_loss_sum(model, collate(rows))
    assert tokens == int(count)
    assert loss == pytest.approx(float(total) / int(count), rel=1e-5)
