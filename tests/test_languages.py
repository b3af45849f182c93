import pytest

from optical_ray import languages
from optical_ray.config import ConfigError, DistillConfig, load_config


@pytest.mark.parametrize("tag", ["sw", "quy", "zh-Hant", "gn", "ay", "sw-KE", "wo", "ti", "yo", "km", "es-419"])
def test_languages_outside_the_shared_data_are_tags(tag):
    assert languages.problem(tag) is None


@pytest.mark.parametrize("tag, why", [
    ("xx", "not a valid BCP-47"), ("Swahili", "not a valid BCP-47"), ("", "empty"), (None, "empty"),
    ("zh_Hant", "did you mean 'zh-Hant'"), ("123", "not a valid BCP-47"),
])
def test_bad_tags_say_why(tag, why):
    assert why in languages.problem(tag)


def test_invalid_lists_each_bad_tag_once():
    assert list(languages.invalid(["sw", "xx", "xx", "en", "yy"])) == ["xx", "yy"]


def test_a_config_names_the_key_of_a_bad_tag():
    cfg = load_config(DistillConfig, {"data": {"languages": "sw,quy", "low_resource": ["sw", "quy"]}})
    assert cfg.data.languages == ["sw", "quy"]
    with pytest.raises(ConfigError, match=r"data.low_resource.*'xx' is not a valid BCP-47"):
        load_config(DistillConfig, {"data": {"low_resource": ["sw", "xx"]}})
