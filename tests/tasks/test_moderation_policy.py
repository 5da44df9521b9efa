"""The moderation policy: OpenAI's 13 categories, thresholds and custom categories from TOML."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest

from glmv.errors import ConfigError
from glmv.server.settings import Settings
from glmv.tasks.moderation import IMAGE_CATEGORIES, OPENAI_CATEGORIES, ModerationPolicy

OPENAI_13 = [
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
]


def test_default_policy() -> None:
    policy = ModerationPolicy.default()
    assert list(OPENAI_CATEGORIES) == OPENAI_13 == policy.names
    assert all(c.threshold == 0.5 for c in policy.categories)
    by_name = {c.name: c for c in policy.categories}
    assert by_name["violence"].applied_to({"text", "image"}) == ["text", "image"]
    assert by_name["hate"].applied_to({"text", "image"}) == ["text"]
    assert by_name["hate"].applied_to({"image"}) == []
    assert sorted(IMAGE_CATEGORIES) == [
        "self-harm",
        "self-harm/instructions",
        "self-harm/intent",
        "sexual",
        "violence",
        "violence/graphic",
    ]
    schema = policy.schema()
    jsonschema.validate(dict.fromkeys(OPENAI_13, False), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**dict.fromkeys(OPENAI_13, False), "extra": True}, schema)
    prompt = policy.prompt("some text", 1)
    assert prompt.startswith("You are a content-safety reviewer")
    assert all(f"- {name}: " in prompt for name in OPENAI_13)
    assert prompt.endswith("<<<\nsome text\n>>>") and "the text and the image" in prompt
    assert "Text under review" not in policy.prompt(None, 2)


def test_policy_from_table() -> None:
    policy = ModerationPolicy.from_table(
        {
            "threshold": 0.7,
            "thresholds": {"sexual": 0.3, "gambling": 0.2},
            "categories": [
                {"name": "gambling", "description": "Promotes betting.", "input_types": ["text"]},
                {"name": "spam/ads", "description": "Unsolicited advertising.", "threshold": 0.9},
            ],
        }
    )
    assert policy.names == [*OPENAI_13, "gambling", "spam/ads"]
    t = {c.name: c.threshold for c in policy.categories}
    assert (t["sexual"], t["violence"], t["gambling"], t["spam/ads"]) == (0.3, 0.7, 0.2, 0.9)
    by_name = {c.name: c for c in policy.categories}
    assert by_name["gambling"].input_types == ("text",)
    assert by_name["spam/ads"].input_types == ("text", "image")


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ({"threshold": 2}, "between 0 and 1"),
        ({"thresholds": {"nope": 0.5}}, "unknown category"),
        ({"categories": [{"name": "hate", "description": "x"}]}, "already a category"),
        ({"categories": [{"name": "Bad Name", "description": "x"}]}, "name must be"),
        ({"categories": [{"name": "x"}]}, "description"),
        ({"categories": [{"name": "x", "description": "d", "input_types": ["audio"]}]}, "input_types"),
        ({"categorys": []}, "unknown key"),
    ],
)
def test_bad_policies(table: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        ModerationPolicy.from_table(table)


def test_policy_comes_from_the_toml_config(tmp_path: Path) -> None:
    path = tmp_path / "glmv.toml"
    path.write_text(
        "max_num_seqs = 4\n\n[moderation]\nthreshold = 0.4\n\n[[moderation.categories]]\n"
        'name = "gambling"\ndescription = "Promotes betting."\n',
        encoding="utf-8",
    )
    settings = Settings.from_sources({}, environ={}, config_file=path)
    assert settings.max_num_seqs == 4
    assert isinstance(settings.moderation, ModerationPolicy)
    assert settings.moderation.names[-1] == "gambling"
    assert Settings.from_sources({}, environ={}).moderation is None
    path.write_text("[moderation]\nthreshold = -1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="threshold"):
        Settings.from_sources({}, environ={}, config_file=path)
