"""Packing on the tiny Llama in float32: conversations share rows without seeing each other."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bot.prompting import IGNORE_INDEX, ChatRenderer, Turn
from tests.tiny import byte_level_tokenizer, tiny_llama
from trainer.loss import assistant_loss_sum
from trainer.packing import PackedCollator, concat, pack, padding_fraction, shared_prefix, unpacked

CONVERSATIONS = [
    [Turn("user", "What's the capital of Germany?"), Turn("assistant", "Berlin, matey.")],
    [
        Turn("user", "hello world"),
        Turn("assistant", "Arr, ye be welcome aboard!"),
        Turn("user", "and France?"),
        Turn("assistant", "Paris it be."),
    ],
    [
        Turn("user", "Soft rain on the roof"),
        Turn("assistant", "the kettle begins to sing\nmorning finds its voice"),
    ],
    [Turn("user", "the quick brown fox"), Turn("assistant", "jumps over the lazy dog 0123456789")],
]


@pytest.fixture(autouse=True)
def _no_grad() -> object:
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def setup() -> tuple[object, ChatRenderer, object]:
    tokenizer = byte_level_tokenizer()
    renderer = ChatRenderer(tokenizer, "chatml")
    model = tiny_llama(tokenizer, seed=1)
    model.config.use_cache = False
    return tokenizer, renderer, model


def _examples(renderer: ChatRenderer, conversations: list[list[Turn]]) -> list[tuple[list[int], list[int]]]:
    out = []
    for turns in conversations:
        ex = renderer.render_training(turns, system="Be brief.")
        out.append((ex.input_ids, ex.labels))
    return out


def _per_conversation_losses(model: object, rows: list, collate: PackedCollator) -> dict[int, float]:
    """Mean loss of each conversation, computed from the rows it was packed into."""
    losses: dict[int, float] = {}
    for row in rows:
        offset = 0
        for member, length in zip(row.members, row.lengths, strict=True):
            batch = collate([row])
            # Score only this member: blank every other label in the row.
            mask = torch.full_like(batch["labels"], IGNORE_INDEX)
            mask[0, offset : offset + length] = batch["labels"][0, offset : offset + length]
            batch["labels"] = mask
            total, count = assistant_loss_sum(model, batch)
            losses[member] = float(total) / int(count)
            offset += length
    return losses


def test_pack_fills_rows_and_keeps_every_example() -> None:
    examples = [([1] * n, [IGNORE_INDEX] + [5] * (n - 1)) for n in (50, 30, 20, 70, 10, 60, 40)]
    rows = pack(examples, max_len=100)
    assert sorted(m for r in rows for m in r.members) == list(range(len(examples)))
    assert all(len(r) <= 100 for r in rows)
    assert len(rows) == 3  # 280 ids in rows of 100
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert len(starts) == len(row.members)
        assert all(row.labels[s] == IGNORE_INDEX for s in starts)  # never a continuation target
    assert sorted(len(r) for r in rows) == [80, 100, 100]
    assert padding_fraction(rows, batch_size=1) == 0.0  # each row alone is its own batch
    assert padding_fraction(rows, batch_size=3) == pytest.approx(1 - 280 / 300)


def test_pack_rejects_an_example_longer_than_the_row() -> None:
    with pytest.raises(ValueError, match="more than the row length"):
        pack([([1] * 11, [IGNORE_INDEX] * 11)], max_len=10)


def test_first_token_of_a_conversation_is_never_trained_as_a_continuation() -> None:
    # Even when a (hypothetical) renderer trains position 0, packing blanks it.
    rows = pack([([7, 8, 9], [7, 8, 9]), ([4, 5], [4, 5])], max_len=10)
    assert rows[0].labels == [IGNORE_INDEX, 8, 9, IGNORE_INDEX, 5]
    assert rows[0].position_ids == [0, 1, 2, 0, 1]


def test_collator_pads_with_its_own_segment_and_counts_padding() -> None:
    rows = pack([([1, 2, 3], [IGNORE_INDEX, 2, 3]), ([4], [IGNORE_INDEX])], max_len=3)
    collate = PackedCollator(pad_token_id=0, pad_to_multiple_of=4)
    batch = collate(rows)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 0, 1, 2]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX], [IGNORE_INDEX] * 4]
    assert "attention_mask" not in batch  # a 2D mask would switch off packed-sequence detection
    assert collate.padding_fraction == pytest.approx(4 / 8)


def test_packed_loss_equals_unpacked_loss_per_conversation(setup: tuple) -> None:
    _, renderer, model = setup
    examples = _examples(renderer, CONVERSATIONS)
    collate = PackedCollator(pad_token_id=0)
    packed = pack(examples, max_len=sum(len(e[0]) for e in examples))
    assert len(packed) == 1 and len(packed[0].members) == len(examples)
    alone = _per_conversation_losses(model, unpacked(examples), collate)
    together = _per_conversation_losses(model, packed, collate)
    for member, loss in alone.items():
        assert together[member] == pytest.approx(loss, abs=1e-4)
    # And the whole-row, token-weighted loss is the token-weighted mean of the conversations.
    total, count = assistant_loss_sum(model, collate(packed))
    batch_alone = [assistant_loss_sum(model, collate([r])) for r in unpacked(examples)]
    expected = sum(float(t) for t, _ in batch_alone) / sum(int(c) for _, c in batch_alone)
    assert float(total) / int(count) == pytest.approx(expected, abs=1e-4)


def test_editing_one_conversation_leaves_the_others_logits_unchanged(setup: tuple) -> None:
    _, renderer, model = setup
    first = _examples(renderer, CONVERSATIONS)
    edited = [[Turn("user", "Python loops and lists"), Turn("assistant", "Aye, ye olde captain matey!")]]
    second = _examples(renderer, edited + CONVERSATIONS[1:])
    assert len(first[0][0]) != len(second[0][0])
    collate = PackedCollator(pad_token_id=0)

    def others_logits(examples: list) -> torch.Tensor:
        # A (index 0) sits between B and the rest: its edit must reach neither side.
        order = [1, 0, 2, 3]
        row = concat([examples[i] for i in order], order)
        batch = collate([row])
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        b_len, a_len = row.lengths[0], row.lengths[1]
        return torch.cat([out.logits[0, :b_len], out.logits[0, b_len + a_len :]])

    assert torch.allclose(others_logits(first), others_logits(second), atol=1e-5)


def test_without_position_restarts_conversations_would_leak(setup: tuple) -> None:
    """The check above can fail: with one position sequence across the row, B does see A."""
    _, renderer, model = setup
    a = _examples(renderer, CONVERSATIONS[:2])
    b = _examples(renderer, [[Turn("user", "Python loops"), Turn("assistant", "Aye!")], CONVERSATIONS[1]])

    def tail_logits(examples: list) -> torch.Tensor:
        ids = torch.tensor([examples[0][0] + examples[1][0]])
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False)
        return out.logits[0, len(examples[0][0]) :]

    assert not torch.allclose(tail_logits(a), tail_logits(b), atol=1e-5)


def test_length_buckets_cover_every_row_once_and_pad_like_the_sorted_order(tmp_path: Path) -> None:
    import random

    from transformers import TrainingArguments

    from trainer.loss import AssistantLossTrainer
    from trainer.packing import LengthBucketSampler, PackedDataset

    rng = random.Random(0)
    sizes = [rng.randint(20, 300) for _ in range(121)]
    rows = pack([([1] * n, [1] * n) for n in sizes], 512)
    assert len(rows) % 4  # one short batch, which must come last
    sampler = LengthBucketSampler([len(r) for r in rows], batch_size=4, seed=3)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(len(rows)))  # every row once per epoch
        orders.append(order)
        # The DataLoader cuts the index stream into batches of 4: those must be the length buckets.
        chunks = [order[i : i + 4] for i in range(0, len(order), 4)]
        assert chunks == sampler.batches()
        padded = sum(max(len(rows[i]) for i in b) * len(b) for b in chunks)
        assert 1 - sum(len(r) for r in rows) / padded == pytest.approx(padding_fraction(rows, 4))
    assert orders[0] != orders[1] != orders[2]  # a new batch order every epoch
    sampler.set_epoch(1)
    assert list(sampler) == orders[1]  # and the same order again for that epoch (resume)
    assert padding_fraction(rows, 4) < 0.05

    # The trainer uses it for packed rows.
    model = tiny_llama(byte_level_tokenizer(), seed=0)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, report_to="none"
    )
    trainer = AssistantLossTrainer(model=model, args=args, train_dataset=PackedDataset(rows))
    chosen = trainer._get_train_sampler()
    assert isinstance(chosen, LengthBucketSampler) and chosen.batch_size == 4


def test_shared_prefix_is_the_common_start_and_stops_before_a_trained_label(setup: tuple) -> None:
    _, renderer, _ = setup
    examples = _examples(renderer, CONVERSATIONS)
    prefix = shared_prefix(examples)
    assert prefix > 5  # the system prompt and the user header
    assert all(ids[:prefix] == examples[0][0][:prefix] for ids, _ in examples)
    assert all(labels[prefix] == IGNORE_INDEX for _, labels in examples)  # predicted at the prefix's end
    # A label inside the common ids cuts the prefix before it.
    ids, labels = examples[0]
    assert shared_prefix([(ids, labels), (list(ids), [IGNORE_INDEX] * 3 + list(ids[3:]))]) == 2
    assert shared_prefix(examples[:1]) == 0


def test_shared_prefix_rows_train_like_the_conversations_apart(setup: tuple) -> None:
    """Losses and gradients with the prefix computed once per row equal those of each conversation alone."""
    _, renderer, model = setup
    examples = _examples(renderer, CONVERSATIONS)
    prefix = shared_prefix(examples)
    collate = PackedCollator(pad_token_id=0)
    longest = max(len(ids) for ids, _ in examples)
    rows = pack(examples, max_len=longest + 40, prefix=prefix)  # some rows share, some do not
    assert any(r.prefix == prefix and len(r.members) > 1 for r in rows)
    assert sum(len(r) for r in rows) == sum(len(ids) for ids, _ in examples) - prefix * sum(
        len(r.members) - 1 for r in rows
    )
    alone = _per_conversation_losses(model, unpacked(examples), collate)
    together = _per_conversation_losses(model, rows, collate)
    for member, loss in alone.items():
        assert together[member] == pytest.approx(loss, abs=1e-4)

    def grads(batches: list[dict]) -> list[torch.Tensor]:
        model.zero_grad()
        with torch.enable_grad():
            for batch in batches:
                total, _ = assistant_loss_sum(model, batch)
                total.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    apart = grads([collate([r]) for r in unpacked(examples)])
    shared = grads([collate(rows)])  # one padded batch of every row
    model.zero_grad()
    assert len(apart) == len(shared)
    for a, s in zip(apart, shared, strict=True):
        assert torch.allclose(a, s, atol=1e-4, rtol=1e-3)


def test_without_the_prefix_mask_a_shared_row_would_be_wrong(setup: tuple) -> None:
    """The check above can fail: without the 4D mask, the members after the first lose their prefix."""
    _, renderer, model = setup
    examples = _examples(renderer, CONVERSATIONS)
    rows = pack(examples, max_len=sum(len(ids) for ids, _ in examples), prefix=shared_prefix(examples))
    assert len(rows) == 1 and len(rows[0].members) == len(examples)
    collate = PackedCollator(pad_token_id=0)
    batch = collate(rows)
    assert batch["attention_mask"].shape == (1, 1, len(rows[0]), len(rows[0]))
    with_mask, _ = assistant_loss_sum(model, batch)
    del batch["attention_mask"]
    without, _ = assistant_loss_sum(model, batch)
    alone = [assistant_loss_sum(model, collate([r])) for r in unpacked(examples)]
    expected = sum(float(t) for t, _ in alone)
    assert float(with_mask) == pytest.approx(expected, rel=1e-4)
    assert float(without) != pytest.approx(expected, rel=1e-3)  # a random tiny model: small but clear
