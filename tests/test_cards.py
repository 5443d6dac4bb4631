"""Model cards are written and read through huggingface_hub's ModelCard: what the Hub parses is
what loramkit meant, and tags are read back however the YAML spells them."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from loramkit import Bundle
from loramkit.bundle.card import compose, render, tags_of
from loramkit.bundle.manifest import bundle_tag
from loramkit.errors import AdapterError
from loramkit.recover.adapter import recover_adapter
from tests.lora_helpers import LoramShop, copy_dir, edit_config


@pytest.fixture(scope="session")
def shop(tmp_path_factory, make_base_dir) -> LoramShop:
    return LoramShop(tmp_path_factory, make_base_dir)


def test_bundle_card_metadata_as_the_hub_reads_it(shop):
    b = Bundle(shop.bundle("llama_gqa"))
    manifest = dict(b.manifest, base=dict(b.base, name_or_path='org/model "quoted": yes', license="apache-2.0"))
    card = ModelCard(render(manifest, "org/bundle"))
    assert card.data.base_model == 'org/model "quoted": yes'  # YAML special characters survive
    assert (card.data.license, card.data.library_name, card.data.base_model_relation) == ("apache-2.0", "loramkit", "finetune")
    assert card.data.tags == ["loram", "pruned", "lora"]
    assert "loramkit train org/bundle" in card.text
    no_license = ModelCard(render(b.manifest))
    assert "license" not in no_license.data.to_dict()


def test_tags_are_read_in_any_yaml_spelling(tmp_path):
    card = tmp_path / "README.md"
    assert tags_of(card) == []  # no card
    card.write_text("# no metadata\n")
    assert tags_of(card) == []
    card.write_text(
        "---\ntags: [lora, 'loram-bundle-0123456789abcdef']\n---\n# flow style\n"
    )  # a regex on "- " lines missed these
    assert tags_of(card) == ["lora", "loram-bundle-0123456789abcdef"]
    card.write_text(compose({"tags": ["a", "b"], "library_name": "peft"}, "# body\n"))
    assert tags_of(card) == ["a", "b"] and card.read_text().endswith("# body\n")
    card.write_text("---\ntags: [unclosed\n---\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        tags_of(card)


def test_recovered_adapter_card(shop, tmp_path):
    b = shop.bundle("llama_gqa")
    out = tmp_path / "full"
    recover_adapter(shop.adapter(b), out, b)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == Bundle(b).base["name_or_path"] and card.data.library_name == "peft"
    assert card.data.tags == ["lora", "loram", "loram-recovered"]
    assert Bundle(b).bundle_id in card.text


def test_adapter_card_in_flow_style_still_binds_the_bundle(shop, tmp_path):
    """The bundle tag is evidence wherever the YAML puts it; a broken card is a clear error."""
    b0, b1 = shop.bundle("mistral", seed=0), shop.bundle("mistral", seed=1)
    adapter = copy_dir(shop.adapter(b0), tmp_path / "adapter")
    edit_config(adapter, base_model_name_or_path=None)  # the card is the only evidence left
    (adapter / "README.md").write_text(f"---\ntags: [lora, {bundle_tag(Bundle(b0).bundle_id)}]\n---\n")
    with pytest.raises(AdapterError, match="trained on"):
        recover_adapter(adapter, tmp_path / "wrong", b1)
    recover_adapter(adapter, tmp_path / "right", b0)
    (adapter / "README.md").write_text("---\ntags: [unclosed\n---\n")
    with pytest.raises(AdapterError, match="README.md: its metadata is not valid YAML"):
        recover_adapter(adapter, tmp_path / "broken", b0)
