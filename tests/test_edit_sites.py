"""Edit sites are found by probing the module tree, whatever the nesting."""

import pytest
from torch import nn

from lalms.edit_sites import EditSites


def test_named_sites_resolve_to_the_right_modules(lalm):
    sites, model = lalm.edit_sites, lalm.model
    assert sites.num_llm_layers == 4 and sites.num_audio_layers == 2
    last = model.get_submodule(sites.resolve("llm.layers.-1"))
    assert last is model.get_submodule(sites.resolve("llm.layers.3"))
    for proj in ("gate_proj", "up_proj", "down_proj"):
        module = model.get_submodule(sites.llm_mlp(-1, proj))
        assert isinstance(module, nn.Linear) and module is getattr(last.mlp, proj)
    assert isinstance(model.get_submodule(sites.resolve("audio.layers.0.fc2")), nn.Linear)
    assert model.get_submodule(sites.resolve("lm_head")) is model.get_output_embeddings()
    connector = model.get_submodule(sites.resolve("connector"))
    assert any(isinstance(m, nn.Linear) for m in connector.modules())
    norm = model.get_submodule(sites.resolve("final_norm"))
    assert "norm" in type(norm).__name__.lower()


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("llm.layers.4", "out of range"),
        ("llm.layers.x", "not an integer"),
        ("llm.blocks.0", "no llm.layers"),
        ("decoder.0", "must start with"),
    ],
)
def test_bad_site_names_raise(lalm, name, match):
    with pytest.raises(KeyError, match=match):
        lalm.edit_sites.resolve(name)


class Wrapper(nn.Module):
    """The same model one level deeper, as a newer transformers layout would nest it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner


def test_probing_follows_a_moved_module_tree(lalm):
    wrapped = Wrapper(lalm.model)
    sites = EditSites.probe(wrapped)
    assert sites.llm_layers == f"inner.{lalm.edit_sites.llm_layers}"
    assert sites.connector == f"inner.{lalm.edit_sites.connector}"
    assert wrapped.get_submodule(sites.llm_mlp(0, "down_proj")) is lalm.model.get_submodule(
        lalm.edit_sites.llm_mlp(0, "down_proj")
    )


def test_overrides_name_paths_explicitly(lalm):
    path = lalm.edit_sites.resolve("audio.layers.1")
    sites = EditSites.probe(lalm.model, {"connector": path})
    assert sites.resolve("connector") == path
    with pytest.raises(AttributeError):
        EditSites.probe(lalm.model, {"connector": "no.such.module"})
    with pytest.raises(ValueError, match="unknown site names"):
        EditSites.probe(lalm.model, {"mlp": path})


def test_a_model_without_decoder_layers_is_rejected():
    with pytest.raises(ValueError, match="no LLM decoder layers"):
        EditSites.probe(nn.Sequential(nn.Linear(2, 2)))
