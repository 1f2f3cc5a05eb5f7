"""Loading peft LoRA folders into `MultiLora`: the scaling peft uses, and clear errors for bad folders."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.generation.lora import AdapterLoadError, MultiLora, load_adapter
from tests.tiny import byte_level_tokenizer, tiny_llama

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_lora_folder(
    base: Any,
    folder: Path,
    *,
    seed: int,
    r: int = 4,
    alpha: int = 8,
    targets: list[str] | None = None,
    rslora: bool = False,
    alpha_pattern: dict[str, int] | None = None,
    scale: float = 1.0,
) -> Path:
    """A peft LoRA adapter of `base` with random (non-zero) A and B, saved like the trainer saves one."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets or ALL_TARGETS,
        init_lora_weights=False,  # random B as well as A: the adapter changes the output
        use_rslora=rslora,
        alpha_pattern=alpha_pattern or {},
    )
    model = get_peft_model(copy.deepcopy(base), config)
    if scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.mul_(scale)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base() -> Any:
    return tiny_llama(byte_level_tokenizer())


def _linears(model: Any) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_scaling_follows_peft(base: Any, tmp_path: Path) -> None:
    plain = make_lora_folder(base, tmp_path / "plain", seed=1, r=4, alpha=8)
    rs = make_lora_folder(base, tmp_path / "rs", seed=2, r=4, alpha=8, rslora=True)
    patterned = make_lora_folder(base, tmp_path / "pat", seed=3, r=4, alpha=8, alpha_pattern={"q_proj": 2})
    kw = {"linears": _linears(base), "device": torch.device("cpu"), "dtype": torch.float32}
    q = "model.layers.0.self_attn.q_proj"
    assert load_adapter(plain, name="a", **kw).modules[q].scaling == 2.0  # alpha / r
    assert load_adapter(rs, name="b", **kw).modules[q].scaling == 4.0  # alpha / sqrt(r)
    loaded = load_adapter(patterned, name="c", **kw)
    assert loaded.modules[q].scaling == 0.5
    assert loaded.modules["model.layers.0.self_attn.k_proj"].scaling == 2.0


def test_multilora_matches_peft_forward(base: Any, tmp_path: Path) -> None:
    from peft import PeftModel

    folder = make_lora_folder(base, tmp_path / "a", seed=5, targets=["q_proj", "v_proj", "down_proj"])
    ids = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        expected = PeftModel.from_pretrained(copy.deepcopy(base), folder)(ids).logits
        model = copy.deepcopy(base)
        lora = MultiLora(model)
        adapter = lora.load("a", folder)
        assert adapter.nbytes > 0
        lora.activate(["a"])
        got = model(ids).logits
        lora.activate([None])
        plain = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, base(ids).logits)
    assert not torch.allclose(got, plain)  # the adapter really changes the output


def test_one_adapter_on_every_row_takes_the_short_path_with_the_same_output(
    base: Any, tmp_path: Path
) -> None:
    folder = make_lora_folder(base, tmp_path / "a", seed=6)
    ids = torch.tensor([[5, 17, 42, 8], [99, 3, 7, 61], [12, 12, 40, 2]])
    model = copy.deepcopy(base)
    lora = MultiLora(model)
    lora.load("a", folder)
    q = lora.wrapped["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        lora.activate(["a", "a", "a"])
        assert q.plan is not None and q.plan.whole == 2.0  # alpha / r
        whole = model(ids).logits
        for one in range(3):  # one row at a time: the decode of one persona's reply
            lora.activate(["a"])
            torch.testing.assert_close(model(ids[one : one + 1]).logits[0], whole[one], rtol=1e-5, atol=1e-5)
        lora.activate(["a", None, "a"])  # a row without the adapter: rows are gathered and scattered
        assert q.plan is not None and q.plan.whole is None
        mixed = model(ids).logits
        lora.activate([None])
        plain = model(ids[1:2]).logits
    torch.testing.assert_close(mixed[0::2], whole[0::2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], plain[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(whole[1], plain[0])


def test_adapters_side_by_side_in_equal_numbers_skip_the_gather_with_the_same_output(
    base: Any, tmp_path: Path
) -> None:
    """Rows ordered a, a, b, b (as the engine orders a decode batch) add their deltas through views;
    the output equals each row's with the gathering path (rows interleaved) and with its adapter alone."""
    a = make_lora_folder(base, tmp_path / "a", seed=7)
    b = make_lora_folder(base, tmp_path / "b", seed=8, r=8, alpha=4)
    ids = torch.tensor([[5, 17, 42, 8], [99, 3, 7, 61], [12, 12, 40, 2], [1, 2, 3, 4]])
    model = copy.deepcopy(base)
    lora = MultiLora(model)
    lora.load("a", a)
    lora.load("b", b)
    q = lora.wrapped["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        lora.activate(["a", "a", "b", "b"])
        assert q.plan is not None and q.plan.grouped
        grouped = model(ids).logits
        interleave = [0, 2, 1, 3]
        lora.activate(["a", "b", "a", "b"])
        assert q.plan is not None and not q.plan.grouped
        gathered = model(ids[interleave]).logits[interleave]  # back to the a, a, b, b order
        alone = []
        for row, name in enumerate(["a", "a", "b", "b"]):
            lora.activate([name])
            alone.append(model(ids[row : row + 1]).logits[0])
        lora.activate(["a", "a", "b", None])  # a base-model row: gathered
        assert q.plan is not None and not q.plan.grouped
    torch.testing.assert_close(grouped, gathered, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped, torch.stack(alone), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(grouped[0], grouped[2])


def test_unloaded_adapter_is_refused(base: Any, tmp_path: Path) -> None:
    model = copy.deepcopy(base)
    lora = MultiLora(model)
    lora.load("a", make_lora_folder(base, tmp_path / "a", seed=1))
    lora.unload("a")
    with pytest.raises(KeyError, match="'a' is not loaded"):
        lora.activate(["a"])


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_bad_adapter_folders_give_one_clear_error(base: Any, tmp_path: Path) -> None:
    lora = MultiLora(copy.deepcopy(base))
    with pytest.raises(AdapterLoadError, match="does not exist"):
        lora.load("x", tmp_path / "missing")

    dora = make_lora_folder(base, tmp_path / "dora", seed=1)
    _edit_config(dora, use_dora=True)
    with pytest.raises(AdapterLoadError, match="use_dora: DoRA adapters are not supported"):
        lora.load("x", dora)

    corrupt = make_lora_folder(base, tmp_path / "corrupt", seed=1)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(AdapterLoadError, match="corrupt or unreadable safetensors"):
        lora.load("x", corrupt)

    no_config = make_lora_folder(base, tmp_path / "noconf", seed=1)
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(AdapterLoadError, match=r"adapter_config\.json: not found"):
        lora.load("x", no_config)

    other_model = tiny_llama(byte_level_tokenizer(), hidden=32)
    wrong = make_lora_folder(other_model, tmp_path / "wrong", seed=1)
    with pytest.raises(AdapterLoadError, match="do not fit the base layer"):
        lora.load("x", wrong)
    assert lora.adapters == {}  # nothing half loaded


def test_nan_weights_are_refused(base: Any, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = make_lora_folder(base, tmp_path / "nan", seed=1)
    weights = load_file(folder / "adapter_model.safetensors")
    first = sorted(weights)[0]
    weights[first][0, 0] = float("nan")
    save_file(weights, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="NaN or infinity"):
        MultiLora(copy.deepcopy(base)).load("x", folder)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "use_dora: DoRA adapters are not supported"),
        ({"bias": "all"}, "bias: biases"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save: modules_to_save"),
        ({"lora_bias": True}, "lora_bias: LoRA bias"),
        ({"layer_replication": [[0, 1]]}, "layer_replication: layer replication"),
        ({"use_qalora": True}, "use_qalora: QA-LoRA"),
        # An option this loader has never heard of is refused too, not silently ignored.
        ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens: the peft option"),
        # peft itself drops keys it does not know (a newer peft wrote them); so does not the loader.
        ({"use_future_lora_trick": True}, r"Unexpected keyword arguments \['use_future_lora_trick'\]"),
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not LORA"),
    ],
)
def test_unsupported_peft_options_name_the_folder_and_the_option(
    base: Any, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    folder = make_lora_folder(base, tmp_path / "opt", seed=1)
    _edit_config(folder, **changes)
    with pytest.raises(AdapterLoadError, match=message) as caught:
        MultiLora(copy.deepcopy(base)).load("x", folder)
    assert str(folder / "adapter_config.json") in str(caught.value)


def test_rank_pattern_is_read_from_the_config(base: Any, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        init_lora_weights=False,
    )
    get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "ranked")
    kw = {"linears": _linears(base), "device": torch.device("cpu"), "dtype": torch.float32}
    loaded = load_adapter(tmp_path / "ranked", name="r", **kw)
    assert loaded.modules["model.layers.0.self_attn.q_proj"].scaling == 2.0  # 8 / 4
    assert loaded.modules["model.layers.0.self_attn.v_proj"].scaling == 4.0  # 8 / 2
    assert loaded.modules["model.layers.0.self_attn.v_proj"].a.shape[0] == 2
    # A config whose rank disagrees with the weights is refused, not scaled wrongly.
    _edit_config(tmp_path / "ranked", rank_pattern={})
    with pytest.raises(AdapterLoadError, match="at rank 4"):
        load_adapter(tmp_path / "ranked", name="r", **kw)
