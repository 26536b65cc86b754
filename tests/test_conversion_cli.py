"""The command line: bad recipes and sources are refused with exit status 2, one line naming the problem and no
output; tensors that lie are refused while streaming; a good run verifies, writes a model card and pushes to the Hub.
(Interrupted runs and the output folder: test_conversion_output.py.)"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fake_hub import FakeHub
from hub_cache import cache_repos
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from conversion.__main__ import main
from conversion.recipe import parse_recipe
from fixtures.tiny_composite import tiny_llm, tiny_tokenizer
from fixtures.tiny_sources import save_tiny_llava


ROOT = Path(__file__).resolve().parents[1]


def _write_recipe(folder: Path, recipe: dict) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def bad_sources(tiny_sources, tmp_path_factory):
    """Sources that must be refused, each broken in one way."""
    root = tmp_path_factory.mktemp("bad")
    wide_base = root / "wide_base"
    tiny_llm(hidden_size=128, intermediate_size=256).save_pretrained(wide_base)
    tiny_tokenizer().save_pretrained(wide_base)
    wide = save_tiny_llava(root / "wide_llava", wide_base)

    other_vocab = shutil.copytree(tiny_sources["llava"], root / "other_vocab")
    tokenizer_file = other_vocab / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    tokenizer_file.write_text(json.dumps(tokenizer))

    corrupt = shutil.copytree(tiny_sources["llava"], root / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header" + b"\x00" * 64)

    pickled = shutil.copytree(tiny_sources["paper_damc_a"], root / "pickled")
    # A pickle that references a callable: loading it without weights_only would import and could call it.
    torch.save(
        {"model.modal_projectors.vision.0.weight": torch.zeros(2), "payload": os.system}, pickled / "adapter_model.bin"
    )
    no_strategy = shutil.copytree(tiny_sources["paper_naive"], root / "no_strategy")
    config = json.loads((no_strategy / "config.json").read_text())
    del config["lora_strategy"]
    (no_strategy / "config.json").write_text(json.dumps(config))
    listed = {}
    for name in ("llava", "base"):  # a config.json that is a JSON list
        listed[name] = shutil.copytree(tiny_sources[name], root / f"{name}_list_config")
        (listed[name] / "config.json").write_text("[1, 2]")
    return {
        "wide": wide,
        "other_vocab": other_vocab,
        "corrupt": corrupt,
        "pickled": pickled,
        "no_strategy": no_strategy,
        "list_config": listed["llava"],
        "list_config_base": listed["base"],
        **_lying_sources(tiny_sources, root),
    }


def _lying_sources(tiny_sources: dict, root: Path) -> dict[str, Path]:
    """Copies of the LLaVA source whose weights lie: integers where floats belong, NaN or Inf in a weight."""
    damage = {
        "int_projector": ("model.multi_modal_projector.linear_1.weight", lambda t: (t * 100).to(torch.int32)),
        "int_llm": ("model.language_model.layers.1.mlp.up_proj.weight", lambda t: (t * 100).to(torch.int64)),
        "nan_llm": (
            "model.language_model.layers.0.self_attn.q_proj.weight",
            lambda t: t.index_fill(1, torch.tensor([3]), float("nan")),
        ),
        "inf_encoder": ("model.vision_tower.embeddings.patch_embedding.weight", lambda t: t.fill_(float("inf"))),
    }
    folders = {}
    for name, (key, change) in damage.items():
        folder = shutil.copytree(tiny_sources["llava"], root / name)
        tensors = load_file(str(folder / "model.safetensors"))
        tensors[key] = change(tensors[key])
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders[name] = folder
    return folders


def _bad_recipes(sources: dict, bad: dict) -> dict[str, tuple[dict, str]]:
    base = str(sources["base"])
    llava = {"path": str(sources["llava"])}
    clip = str(sources["clip"])
    return {
        "unknown method": ({"method": "soup", "base": base, "sources": [llava]}, "method 'soup' is unknown"),
        "unknown rule": (
            {"base": base, "merge": {"rule": "average"}, "sources": [llava]},
            "merge.rule 'average' is unknown",
        ),
        "missing source": (
            {"base": base, "sources": [{"path": "/no/such/folder"}]},
            "'/no/such/folder' does not exist",
        ),
        "other hidden size": (
            {"base": base, "sources": [{"path": str(bad["wide"])}]},
            "hidden_size is 128 but the base's is 64",
        ),
        "other vocabulary": (
            {"base": base, "sources": [{"path": str(bad["other_vocab"])}]},
            "differs from the base's on the base vocabulary",
        ),
        "duplicate modality": (
            {"base": base, "sources": [llava, {"path": str(sources["llava_2"])}]},
            "Two sources claim the modality name 'image'",
        ),
        "damc on a full fine-tune": ({"method": "damc", "base": base, "sources": [llava]}, "use `method: routed`"),
        "corrupt safetensors": (
            {"base": base, "sources": [{"path": str(bad["corrupt"])}]},
            "is not a valid safetensors file",
        ),
        "rename to a bad name": (
            {"base": base, "sources": [{**llava, "rename": {"image": "my image"}}]},
            "'my image' cannot name a modality",
        ),
        "rename onto another modality": (
            {"base": base, "sources": [{"path": str(sources["video_llava"]), "rename": {"image": "video"}}]},
            "two of its modalities are both called ['video']",
        ),
        "paper checkpoint with no strategy": (
            {"base": base, "sources": [{"path": str(bad["no_strategy"]), "encoder": clip}]},
            "are not used under lora_strategy None",
        ),
        "negative weight with ties": (
            {"base": base, "merge": {"rule": "ties", "density": 0.5}, "sources": [{**llava, "weight": -1}]},
            "needs weights >= 0",
        ),
        "pickle with code": (
            {"base": base, "sources": [{"path": str(bad["pickled"]), "encoder": clip}]},
            "is not a plain checkpoint of tensors",
        ),
        "the paper's modality name": (
            {
                "method": "damc",
                "base": base,
                "sources": [{"path": str(sources["paper_damc_a"]), "encoder": clip, "modalities": ["vision"]}],
            },
            "`modalities` names ['vision'], but this source has ['image']",
        ),
        "a key the format does not read": (
            {"base": base, "sources": [{**llava, "feature_layer": -1, "encoder": clip}]},
            "['encoder', 'feature_layer'] do not apply to a llava source",
        ),
        "a weight beyond float32": (
            {"base": base, "sources": [{**llava, "weight": "1e300"}]},
            "is 1e+300, beyond what float32",
        ),
        "a source config that is a list": (
            {"base": base, "sources": [{"path": str(bad["list_config"])}]},
            "config.json holds a JSON list, not an object",
        ),
        "a base config that is a list": (
            {"base": str(bad["list_config_base"]), "sources": [llava]},
            "config.json holds a JSON list, not an object",
        ),
        "a chat template that is not Jinja": (
            {"base": base, "sources": [llava], "chat_template": "{% for m in messages %}{{ m.content }"},
            "chat_template is not a valid Jinja template (line 1:",
        ),
        "a chat template that fails to render": (
            {"base": base, "sources": [llava], "chat_template": "{{ messages[0].content | no_such_filter }}"},
            "chat_template is not a valid Jinja template",
        ),
        "a chat template that raises": (
            {"base": base, "sources": [llava], "chat_template": "{{ raise_exception('roles must alternate') }}"},
            "chat_template fails on a plain user/assistant exchange (TemplateError: roles must alternate)",
        ),
    }


def _lying_recipes(sources: dict, bad: dict) -> dict[str, tuple[dict, str]]:
    """Recipes whose problem shows only once a tensor is read (after the checks): refused while writing."""
    base = str(sources["base"])
    source = lambda name: {"base": base, "sources": [{"path": str(bad[name])}]}  # noqa: E731
    tensor = lambda key: f"tensor 'model.{key}' in model.safetensors"  # noqa: E731
    return {
        "an int32 projector": (
            source("int_projector"),
            tensor("multi_modal_projector.linear_1.weight")
            + " holds torch.int32 values where the composite needs floating-point weights",
        ),
        "an int64 LLM weight": (
            source("int_llm"),
            tensor("language_model.layers.1.mlp.up_proj.weight") + " holds torch.int64 values",
        ),
        "NaN in an LLM weight": (
            source("nan_llm"),
            tensor("language_model.layers.0.self_attn.q_proj.weight") + " holds 64 NaN or infinite value(s) of 4096",
        ),
        "Inf in an encoder": (
            source("inf_encoder"),
            tensor("vision_tower.embeddings.patch_embedding.weight") + " holds",
        ),
        "a merge that overflows float16": (
            {"base": base, "dtype": "float16", "sources": [{"path": str(sources["llava"]), "weight": 1.0e9}]},
            "NaN or infinite value(s) in torch.float16 although every source tensor is finite: the merge overflows",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "an int32 projector",
        "an int64 LLM weight",
        "NaN in an LLM weight",
        "Inf in an encoder",
        "a merge that overflows float16",
    ],
)
def test_a_tensor_that_lies_is_refused_while_streaming_naming_the_source_and_tensor(
    case, tiny_sources, bad_sources, tmp_path, capsys
):
    recipe, message = _lying_recipes(tiny_sources, bad_sources)[case]
    code, _, err = _run([_write_recipe(tmp_path, recipe), tmp_path / "out", "--no-verify"], capsys)
    assert code == 2
    assert message in err.splitlines()[-1], err
    if case != "a merge that overflows float16":
        assert err.splitlines()[-1].startswith("error: sources[0] (")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["recipe.yaml"], "no partial folder may be left"


@pytest.mark.parametrize(
    "case",
    [
        "unknown method",
        "unknown rule",
        "missing source",
        "other hidden size",
        "other vocabulary",
        "duplicate modality",
        "damc on a full fine-tune",
        "corrupt safetensors",
        "pickle with code",
        "rename to a bad name",
        "rename onto another modality",
        "paper checkpoint with no strategy",
        "negative weight with ties",
        "a key the format does not read",
        "the paper's modality name",
        "a weight beyond float32",
        "a source config that is a list",
        "a base config that is a list",
        "a chat template that is not Jinja",
        "a chat template that fails to render",
        "a chat template that raises",
    ],
)
def test_bad_recipe_or_source_exits_2_with_one_line_and_no_output(case, tiny_sources, bad_sources, tmp_path, capsys):
    recipe, message = _bad_recipes(tiny_sources, bad_sources)[case]
    output = tmp_path / "out"
    code, out, err = _run([_write_recipe(tmp_path, recipe), output], capsys)
    assert code == 2
    assert message in err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not output.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["recipe.yaml"], "no partial folder may be left"


def test_hub_sources_convert_offline_verify_and_get_a_model_card(tiny_sources, tmp_path):
    """Sources named by Hub id (served from a local cache, offline) end up in the card's front matter with their
    revisions; the command verifies the result in a fresh process and says so."""
    hf_home = tmp_path / "hf_home"
    cache_repos(
        hf_home,
        {
            "tiny-org/base": tiny_sources["base"],
            "tiny-org/llava": tiny_sources["llava"],
            "tiny-org/video-llava": tiny_sources["video_llava"],
        },
    )
    recipe = _write_recipe(
        tmp_path,
        {
            "name": "tiny-vision-video",
            "base": "tiny-org/base",
            "sources": [
                {"path": "tiny-org/llava", "weight": 0.5},
                {"path": "tiny-org/video-llava", "weight": 0.5, "modalities": ["video"]},
            ],
        },
    )
    output = tmp_path / "out"
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
    environment.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "conversion", str(recipe), str(output)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "verified: a fresh process loaded CompositeMLLMForCausalLM" in result.stderr
    card = ModelCard.load(output / "README.md")
    assert card.data.base_model == ["tiny-org/base", "tiny-org/llava", "tiny-org/video-llava"]
    assert card.data.base_model_relation == "merge"
    assert {"model-composition", "multimodal", "merge", "custom_code"} <= set(card.data.tags)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "any-to-any"
    for repo_id in ("tiny-org/llava", "tiny-org/video-llava"):
        assert repo_id in card.text
    assert (output / "composite_recipe.yaml").read_text() == recipe.read_text()
    assert yaml.safe_load(card.text.split("```yaml\n", 1)[1].split("```", 1)[0]) == yaml.safe_load(recipe.read_text())
    sources = json.loads((output / "config.json").read_text())["composition"]["sources"]
    assert [source["hub_id"] for source in sources] == ["tiny-org/llava", "tiny-org/video-llava"]
    assert all(len(source["revision"]) == 40 for source in sources)


def test_push_to_hub_uploads_exactly_the_folder(tiny_sources, tmp_path):
    recipe = _write_recipe(tmp_path, {"base": str(tiny_sources["base"]), "sources": [str(tiny_sources["llava"])]})
    output = tmp_path / "out"
    with FakeHub(orgs=("tiny-org",)) as hub:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "conversion",
                str(recipe),
                str(output),
                "--no-verify",
                "--push-to-hub",
                "tiny-org/composite",
                "--private",
            ],
            cwd=ROOT,
            env=hub.environment(dict(os.environ)),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr
        assert [(repo.repo_id, repo.private) for repo in hub.created_repos] == [("tiny-org/composite", True)]
        uploaded = hub.files("tiny-org/composite")
    on_disk = {str(path.relative_to(output)): path.read_bytes() for path in output.rglob("*") if path.is_file()}
    assert uploaded == on_disk
    assert uploaded["README.md"].startswith(b"---\n") and b"model-composition" in uploaded["README.md"]


def test_the_installed_command_prints_exactly_one_line_on_a_user_error(tmp_path):
    """The real process: nothing but the error reaches stderr (no warnings from imports, no traceback)."""
    recipe = _write_recipe(tmp_path, {"base": "/no/such/base", "sources": ["/no/such/source"]})
    result = subprocess.run(
        [sys.executable, "-m", "conversion", str(recipe), str(tmp_path / "out")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: base: the folder '/no/such/base' does not exist; check the path (or give a Hub id)."
    ]
    assert not (tmp_path / "out").exists()


def test_remote_code_pointers_of_a_source_never_reach_the_composite(tiny_sources, tmp_path, capsys):
    """A base whose tokenizer files point at remote code elsewhere: the composite (loaded with trust_remote_code=True)
    must not carry that pointer."""
    base = shutil.copytree(tiny_sources["base"], tmp_path / "base")
    config_file = base / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["someorg/evil--tokenization_evil.EvilTokenizer", None]}
    config_file.write_text(json.dumps(tokenizer_config))
    recipe = _write_recipe(tmp_path, {"base": str(base), "sources": [str(tiny_sources["llava"])]})
    code, _, err = _run([recipe, tmp_path / "out", "--no-verify"], capsys)
    assert code == 0, err
    for name in ("tokenizer_config.json", "processor_config.json", "config.json"):
        assert "evil" not in (tmp_path / "out" / name).read_text()


@pytest.mark.parametrize(("written", "value"), [("1e-3", 0.001), ("0.5", 0.5), ("1.0e+2", 100.0), ("-2", -2.0)])
def test_a_weight_yaml_reads_as_text_is_taken_as_the_number_it_is(written, value):
    # YAML 1.1 reads 1e-3 (no dot, unsigned exponent) as a string.
    recipe = parse_recipe(yaml.safe_load(f"base: b\nsources:\n  - path: x/y\n    weight: {written}\n"))
    assert recipe.sources[0].weight == value


def test_an_unexpected_failure_still_ends_in_one_line_and_status_2(monkeypatch, tmp_path, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("something nobody foresaw\nover two lines")

    monkeypatch.setattr("conversion.composer.compose", broken)  # what main() imports when it runs
    code, _, err = _run([tmp_path / "recipe.yaml", tmp_path / "out"], capsys)
    assert code == 2
    assert err.splitlines() == [
        "error: unexpected RuntimeError: something nobody foresaw over two lines (please report it; rerun with -v for "
        "the traceback)"
    ]
    code, _, err = _run([tmp_path / "recipe.yaml", tmp_path / "out", "-v"], capsys)
    assert code == 2 and err.startswith("Traceback")
    assert err.splitlines()[-1].startswith("error: unexpected RuntimeError")
