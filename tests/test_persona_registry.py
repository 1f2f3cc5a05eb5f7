"""Persona discovery: builtin folders, the user's folder, and third-party packages' entry points."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bot.config import Settings
from bot.errors import PersonaError
from bot.runtime import load_registry
from personas.registry import ENTRY_POINT_GROUP, PersonaRegistry, scan
from tests.test_persona_spec import GOOD, persona_folder


def install_distribution(
    site: Path, monkeypatch: pytest.MonkeyPatch, name: str, entry_points: dict[str, str], module_code: str
) -> None:
    """A tiny installed distribution: `<name>/__init__.py` plus `<name>-1.0.dist-info` with entry points.

    This is what `pip install` leaves in site-packages; importlib.metadata finds it on sys.path.
    """
    package = site / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(module_code))
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}\n")
    (info / "RECORD").write_text("")
    monkeypatch.syspath_prepend(str(site))


PACKAGE_CODE = """
from pathlib import Path

from personas.spec import PersonaSpec

# A persona folder shipped inside the package.
FOLDER = Path(__file__).parent / "saltwater"

def make_spec():
    # A persona defined in code; its dialogue paths are relative to this module's folder.
    return PersonaSpec(slug="kraken", name="The Kraken", system_prompt="You are the Kraken.", dialogues=[])

AS_DICT = {"slug": "siren", "name": "Siren", "dialogues": []}
"""


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = tmp_path / "site"
    install_distribution(
        site,
        monkeypatch,
        "seafolk_personas",
        {
            "saltwater": "seafolk_personas:FOLDER",
            "kraken": "seafolk_personas:make_spec",
            "siren": "seafolk_personas:AS_DICT",
        },
        PACKAGE_CODE,
    )
    persona_folder(site / "seafolk_personas", "saltwater")
    return site


def test_entry_point_personas_are_found(third_party: Path) -> None:
    registry = PersonaRegistry.discover()
    assert {"assistant", "pirate", "poet", "saltwater", "kraken", "siren"} <= {p.slug for p in registry.all()}
    saltwater = registry.get("saltwater")
    assert saltwater.source == "entry-point:seafolk_personas 1.0 (saltwater = seafolk_personas:FOLDER)"
    assert saltwater.folder == third_party / "seafolk_personas" / "saltwater"
    assert saltwater.spec.name == "Tester" and saltwater.dialogue_paths()[0].is_file()
    kraken = registry.get("kraken")
    assert kraken.spec.name == "The Kraken" and kraken.folder == (third_party / "seafolk_personas").resolve()
    assert registry.get("siren").source.startswith("entry-point:seafolk_personas 1.0")


def test_the_runtime_registry_includes_user_folder_and_entry_points(
    third_party: Path, tmp_path: Path
) -> None:
    persona_folder(tmp_path / "data" / "personas", "mine")  # default user folder: <data_dir>/personas
    registry = load_registry(Settings())
    assert registry.get("mine").source.startswith("user:")
    assert "saltwater" in registry


def test_user_folder_from_config(tmp_path: Path) -> None:
    persona_folder(tmp_path / "elsewhere", "mine")
    registry = load_registry(Settings(personas_dir=tmp_path / "elsewhere"))
    assert registry.get("mine").source == f"user:{tmp_path / 'elsewhere'}"


def test_duplicate_slug_names_both_sources(tmp_path: Path) -> None:
    persona_folder(tmp_path / "mine", "pirate")
    with pytest.raises(PersonaError) as info:
        PersonaRegistry.discover(tmp_path / "mine", entry_points=False)
    message = str(info.value)
    assert message.startswith("persona 'pirate' is defined twice: builtin (")
    assert "personas/pirate)" in message
    assert f"and user:{tmp_path / 'mine'} ({tmp_path / 'mine' / 'pirate'})" in message


def test_duplicate_between_user_folder_and_package(third_party: Path, tmp_path: Path) -> None:
    persona_folder(
        tmp_path / "mine", "kraken", GOOD.replace('name = "Tester"', 'slug = "kraken"\nname = "T"')
    )
    with pytest.raises(
        PersonaError, match=r"persona 'kraken' is defined twice: user:.* and entry-point:seafolk"
    ):
        PersonaRegistry.discover(tmp_path / "mine")


def test_broken_package_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_distribution(
        tmp_path / "site", monkeypatch, "broken_pack", {"oops": "broken_pack:MISSING"}, "X = 1\n"
    )
    with pytest.raises(PersonaError) as info:
        PersonaRegistry.discover()
    assert str(info.value).startswith(
        "entry-point:broken_pack 1.0 (oops = broken_pack:MISSING): cannot load:"
    )


def test_package_yielding_the_wrong_thing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_distribution(tmp_path / "site", monkeypatch, "odd_pack", {"odd": "odd_pack:X"}, "X = 42\n")
    with pytest.raises(PersonaError, match=r"odd_pack:X\): yields int; expected a folder path"):
        PersonaRegistry.discover()


def test_scan_reports_every_problem_and_keeps_the_good(tmp_path: Path) -> None:
    persona_folder(tmp_path, "good")
    persona_folder(tmp_path, "badcron", GOOD.replace("0 9 * * mon-fri", "0 25 * * *"))
    persona_folder(tmp_path, "badtoml", "name = \n")
    personas, problems = scan(tmp_path, entry_points=False)
    assert "good" in {p.slug for p in personas}
    assert not {"badcron", "badtoml"} & {p.slug for p in personas}
    assert len(problems) == 2
    assert any("badcron/persona.toml: schedule.0.cron: invalid cron expression" in m for m in problems)
    assert any("badtoml/persona.toml: invalid TOML" in m for m in problems)


def test_reload_keeps_the_old_personas_when_the_new_files_are_bad(tmp_path: Path) -> None:
    folder = persona_folder(tmp_path, "mine")
    registry = PersonaRegistry.discover(tmp_path, entry_points=False)
    assert registry.get("mine").spec.sampling.top_p == 0.9

    (folder / "persona.toml").write_text(GOOD.replace("top_p = 0.9", "top_p = 0.5"))
    registry.reload()
    assert registry.get("mine").spec.sampling.top_p == 0.5

    for bad in (GOOD.replace("top_p = 0.9", "top_p = 7"), "name = [", GOOD.replace("d.jsonl", "gone.jsonl")):
        (folder / "persona.toml").write_text(bad)
        with pytest.raises(PersonaError, match=r"mine/persona\.toml"):
            registry.reload()
        assert registry.get("mine").spec.sampling.top_p == 0.5
        assert len(registry) == 4


def test_unknown_slug_lists_the_known_ones() -> None:
    registry = PersonaRegistry.discover(entry_points=False)
    with pytest.raises(PersonaError, match=r"unknown persona 'kraken'; available: assistant, pirate, poet"):
        registry.get("kraken")
