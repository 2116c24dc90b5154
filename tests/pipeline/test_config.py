import dataclasses
import json
import re
from pathlib import Path

import pytest

import pipeline.config
from pipeline.config import (Config, DatasetSpec, ExecutorKind, FolderSpec, Mode, Precision, SourceKind, SourceSpec,
                             StorageDtype, apply_overrides, comparable_identity, identity_diff, load_config)
from pipeline.errors import ConfigError

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "dump-0.1.0"


def test_empty_config_is_the_embedded_default():
    cfg = Config.from_dict({})
    assert cfg.model.name == "resnet18"
    assert cfg.model.layers == ("layer3", "layer4")
    assert cfg.model.mode is Mode.GRAB and cfg.model.precision is Precision.FP32
    assert cfg.source.kind is SourceKind.GENERATED
    assert cfg.dump.dtype is StorageDtype.FLOAT16
    assert cfg.shapes_fixed()


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name: resnet50\n  layers: [layer2]\nrun:\n  batch_size: 16\n")
    cfg = load_config(path, ["run.batch_size=64", "source.preprocess.crop=224", "model.precision=bf16"])
    assert cfg.model.name == "resnet50" and cfg.model.layers == ("layer2",)
    assert cfg.run.batch_size == 64
    assert cfg.source.preprocess.crop == (224, 224)
    assert cfg.model.precision is Precision.BF16


@pytest.mark.parametrize("data, message", [
    ({"modle": {}}, "modle: unknown key; did you mean 'model'?"),
    ({"run": {"batch_size": 0}}, "run.batch_size: must be at least 1, got 0"),
    ({"run": {"batch_size": "8"}}, "run.batch_size: expected an integer, got '8'"),
    ({"model": {"precision": "bf61"}}, "model.precision: 'bf61' is not valid; did you mean 'bf16'?"),
    ({"model": {"layers": []}}, "model.layers: expected a non-empty list of layer ids, got []"),
    ({"model": {"layers": ["a", "a"]}}, "model.layers: lists a layer twice: ['a', 'a']"),
    ({"model": {"mode": "stump", "layers": ["a", "b"]}},
     "model.layers: stump mode takes exactly one layer, got ['a', 'b']; use mode: grab for several"),
    ({"source": {"kind": "folder"}},
     "source.path: required for source.kind 'folder' (e.g. '/data/images')"),
    ({"source": {"kind": "dataset", "target": "nocolon"}},
     "source.target: 'nocolon' is not of the form 'package.module:callable'"),
    ({"source": {"preprocess": {"normalize": "imagenette"}}},
     "source.preprocess.normalize: 'imagenette' is not valid; valid: 'imagenet', 'none', 'model' or "
     "{mean: [r, g, b], std: [r, g, b]}"),
    ({"source": {"preprocess": {"crop": [0, 3]}}},
     "source.preprocess.crop: expected a positive int or [height, width], got [0, 3]"),
    ({"dump": {"reduce": "max"}}, "dump.reduce: 'max' is not valid; valid: 'none', 'pool', 'channel_mean', 'cls', 'mean'"),
    ({"run": {"strict": "yes"}}, "run.strict: expected true or false, got 'yes'"),
    ({"run": 3}, "run: expected a mapping, got 3"),
    ({"run": {"executor": "dask"}}, "run.executor: 'dask' is not valid; valid: 'ray', 'local'"),
    ({"source": {"kind": "folders", "path": "/x"}}, "source.kind: 'folders' is not valid; did you mean 'folder'?"),
    ({"source": {"kind": "folder", "path": "/x", "pth": "/y"}}, "source.pth: unknown key; did you mean 'path'?"),
    ({"source": {"kind": "dataset"}},
     "source.target: required for source.kind 'dataset' (e.g. 'package.module:callable')"),
    ({"source": {"kind": "parquet", "path": "/x", "columns": "label"}},
     "source.columns: expected a list of column names, got 'label'"),
    ({"source": {"preprocess": 3}}, "source.preprocess: expected a mapping, got 3"),
    # a key in another section than its own
    ({"source": {"crop": 224}}, "source.crop: unknown key; it belongs in source.preprocess.crop"),
    ({"model": {"batch_size": 8}}, "model.batch_size: unknown key; it belongs in run.batch_size"),
    ({"layers": ["layer3"]}, "layers: unknown key; it belongs in model.layers"),
    # auto, in any case, where a key takes it: its messages say so
    ({"run": {"actors": "automatic"}}, "run.actors: expected an integer, got 'automatic'; or auto"),
    ({"run": {"gpus_per_actor": "0.5 GPU"}}, "run.gpus_per_actor: expected a finite number, got '0.5 GPU'; or auto"),
])
def test_bad_values_name_the_key_and_what_is_valid(data, message):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(data)
    assert str(info.value) == message


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_override_errors():
    with pytest.raises(ConfigError, match="is not of the form key.path=value"):
        apply_overrides({}, ["batch_size"])
    with pytest.raises(ConfigError, match="run.output: is a value, not a section"):
        apply_overrides({"run": {"output": "x"}}, ["run.output.deep=1"])


def test_normalize_mean_std():
    cfg = Config.from_dict({"source": {"preprocess": {"normalize": {"mean": [0.5] * 3, "std": [0.25] * 3}}}})
    assert cfg.source.preprocess.mean_std() == ((0.5,) * 3, (0.25,) * 3)
    assert Config.from_dict({"source": {"preprocess": {"normalize": "none"}}}).source.preprocess.mean_std() is None


def test_a_key_given_twice_is_refused_naming_it_and_its_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  output: /data/run1\nmodel:\n  layers: [layer2]\nrun:\n  batch_size: 64\n")
    with pytest.raises(ConfigError, match=r"c.yaml': the key 'run' is given twice \(lines 1 and 5\); give each "
                                          r"key once"):
        load_config(path)
    path.write_text("run: {batch_size: 8, batch_size: 64}\n")
    with pytest.raises(ConfigError, match=r"the key 'batch_size' is given twice \(line 1\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"model.kwargs: .*the key 'a' is given twice"):
        apply_overrides({}, ["model.kwargs={a: 1, a: 2}"])
    # a merge may still override the keys it brings in
    merged = pipeline.config._read_yaml("base: &base {batch_size: 8, strict: true}\nrun: {<<: *base, batch_size: 64}")
    assert merged["run"] == {"batch_size": 64, "strict": True}


@pytest.mark.parametrize("content, problem", [
    (b"# r\xe9sum\xe9 of the run\nrun: {batch_size: 4}\n", r"is not UTF-8 text \(byte 0xe9 at offset 3\); save it "
                                                           r"as UTF-8"),
    (None, "is a folder; give a YAML file")], ids=["latin-1", "folder"])
def test_a_config_file_that_cannot_be_read_is_a_config_error_naming_it(tmp_path, content, problem):
    path = tmp_path / "c.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"config file '{re.escape(str(path))}' {problem}"):
        load_config(path)


def test_identity_ignores_resources_but_not_content():
    a = Config.from_dict({})
    b = Config.from_dict({"run": {"actors": 7, "batch_size": 3, "output": "elsewhere"}})
    c = Config.from_dict({"run": {"shard_size": 100}})
    assert a.identity() == b.identity()
    assert identity_diff(a.identity(), c.identity()) == ["shard_size: 256 -> 100"]


def test_to_dict_round_trips():
    cfg = Config.from_dict({"model": {"layers": ["layer1"], "kwargs": {"num_classes": 3}},
                            "source": {"preprocess": {"crop": 32}}})
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_variable_shapes_when_images_are_not_cropped():
    assert not Config.from_dict({"source": {"kind": "folder", "path": "/x"}}).shapes_fixed()
    assert Config.from_dict({"source": {"kind": "folder", "path": "/x", "preprocess": {"crop": 8}}}).shapes_fixed()
    assert Config.from_dict({"source": {"kind": "folder", "path": "/x"}, "dump": {"shapes": "fixed"}}).shapes_fixed()


@pytest.mark.parametrize("value", [0, 0.0, -0.5])
def test_cpus_per_actor_must_be_more_than_0(value):
    with pytest.raises(ConfigError, match=rf"^run.cpus_per_actor: must be more than 0, got {value:g}; give the CPUs "
                                          r"each actor reserves \(1, or a fraction such as 0.5\), or auto$"):
        Config.from_dict({"run": {"cpus_per_actor": value}})
    assert Config.from_dict({"run": {"cpus_per_actor": 0.25}}).run.cpus_per_actor == 0.25


def test_executor_defaults_to_ray():
    assert Config().run.executor is ExecutorKind.RAY
    assert Config.from_dict({"run": {"executor": "LOCAL"}}).run.executor is ExecutorKind.LOCAL


def test_each_source_kind_holds_only_its_keys(caplog):
    folder = {"kind": "folder", "path": "/x"}
    cfg = Config.from_dict({"source": {**folder, "count": 5, "image_column": "img"}})
    assert isinstance(cfg.source, FolderSpec) and cfg.source.kind is SourceKind.FOLDER
    assert cfg.source.to_dict() == {**folder, "preprocess": {"resize": None, "crop": None, "normalize": "imagenet",
                                                             "channels": 3, "max_pixels": 89_478_485}}
    assert cfg.identity() == Config.from_dict({"source": folder}).identity()
    assert [r.getMessage() for r in caplog.records] == [
        "source.count is not used by source.kind 'folder'; it is ignored",
        "source.image_column is not used by source.kind 'folder'; it is ignored"]
    assert Config.from_dict(cfg.to_dict()) == cfg
    dataset = Config.from_dict({"source": {"kind": "dataset", "target": "m:f", "kwargs": {"n": 3}}}).source
    assert dataset == DatasetSpec(target="m:f", kwargs={"n": 3})
    assert set(dataset.to_dict()) == {"kind", "preprocess", "target", "kwargs"}


def test_every_kind_has_a_section_and_no_base_section_is_built():
    assert set(SourceSpec._kinds) == set(SourceKind)
    for kind, section in SourceSpec._kinds.items():
        assert section.kind is kind and Config.from_dict({"source": {"kind": kind.value, "path": "/x",
                                                                      "target": "m:f"}}).source.kind is kind
    with pytest.raises(TypeError, match="SourceSpec is not a source kind; use one of GeneratedSpec"):
        SourceSpec()


def test_every_field_declares_its_check_and_no_key_is_typed_by_hand():
    sections = [obj for obj in vars(pipeline.config).values()
                if isinstance(obj, type) and dataclasses.is_dataclass(obj) and issubclass(obj, pipeline.config._Section)]
    assert len(sections) == 11
    for section in sections:
        assert all(callable(f.metadata.get("check")) for f in dataclasses.fields(section)), section
    lines = Path(pipeline.config.__file__).read_text().splitlines()
    text = "\n".join(line for line in lines if not line.strip().startswith("_prefix = "))
    assert not re.findall(r"""["'](?:model|source|dump|run)\.\w+["']""", text)


def test_a_manifest_of_release_0_1_0_compares_by_the_keys_of_its_source_kind():
    for name in ("generated", "variable"):
        manifest = json.loads((FIXTURE / name / "_actmap" / "manifest.json").read_text())
        assert "count" in manifest["identity"]["source"], "0.1.0 kept every kind's keys"
        again = Config.from_dict(manifest["config"]).identity()
        assert identity_diff(comparable_identity(manifest["identity"]), comparable_identity(again)) == []
    manifest = json.loads((FIXTURE / "variable" / "_actmap" / "manifest.json").read_text())
    assert set(comparable_identity(manifest["identity"])["source"]) == {"kind", "path", "preprocess"}



@pytest.mark.parametrize("kind", ["folder", "parquet", "webdataset"])
def test_a_source_path_spelled_another_way_is_the_same_source(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    src = str(tmp_path / "src")

    def identity(path):
        return Config.from_dict({"source": {"kind": kind, "path": path}}).identity()

    stored = identity(src)  # a manifest holds the path as its config spelled it
    for path in (src + "/", "src", "./src/", "~/src", src.replace("/", "//"), "file://" + src, "file://" + src + "/"):
        assert identity_diff(comparable_identity(stored), comparable_identity(identity(path))) == [], path
        assert identity_diff(comparable_identity(identity(path)), comparable_identity(stored)) == [], path
    assert identity_diff(comparable_identity(stored), comparable_identity(identity(src + "2"))) != []
    uri = identity("s3://bucket/prefix")
    assert identity_diff(comparable_identity(uri), comparable_identity(identity("s3://bucket/prefix/"))) == []
    assert identity_diff(comparable_identity(uri), comparable_identity(identity("s3://bucket/other"))) != []
    assert comparable_identity(uri)["source"]["path"] == "s3://bucket/prefix"
    if kind == "webdataset":  # a list of patterns: each spelled one way
        listed = Config.from_dict({"source": {"kind": kind, "path": [src + "/a.tar", "s3://b/c.tar"]}}).identity()
        assert comparable_identity(listed)["source"]["path"] == [src + "/a.tar", "s3://b/c.tar"]
        again = Config.from_dict({"source": {"kind": kind, "path": ["src//a.tar", "s3://b/c.tar"]}}).identity()
        assert identity_diff(comparable_identity(listed), comparable_identity(again)) == []


# -- config keys in messages: derived from the sections, never spelled by hand ---------------------

SECTIONS = [pipeline.config.ModelSpec, pipeline.config.DumpSpec, pipeline.config.RunSpec,
            pipeline.config.PreprocessSpec, *SourceSpec._kinds.values()]
PIPELINE = Path(pipeline.config.__file__).parent


def test_a_sections_field_key_is_derived_and_a_name_that_is_no_field_raises():
    assert pipeline.config.RunSpec.key("strict") == "run.strict"
    assert pipeline.config.ParquetSpec.key("image_column") == "source.image_column"
    assert pipeline.config.PreprocessSpec.key("max_pixels") == "source.preprocess.max_pixels"
    assert FolderSpec.key("kind") == "source.kind" and Config.key("model") == "model"
    with pytest.raises(AttributeError, match=r"FolderSpec has no field 'image_column'; valid: 'kind', "):
        FolderSpec.key("image_column")  # a key of another source kind


def _strings_and_key_calls(path: Path):
    """The string constants of a module (docstrings and ``_prefix`` values aside), and its
    ``Section.key("field")`` calls as (section name, field, line)."""
    import ast

    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            skip.add(id(first.value))  # a docstring
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_prefix" for t in node.targets):
            skip.add(id(node.value))
    strings = [(n.value, n.lineno) for n in ast.walk(tree)
               if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]
    calls = [(n.func.value.id, n.args[0].value, n.lineno) for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "key"
             and isinstance(n.func.value, ast.Name) and n.args and isinstance(n.args[0], ast.Constant)]
    return strings, calls


def test_no_module_spells_a_config_key_by_hand_and_every_derived_key_names_a_field():
    keys = {section._key(name) for section in SECTIONS for name in section._names()}
    spelled = re.compile(r"(?<![\w.])(" + "|".join(map(re.escape, sorted(keys, key=len, reverse=True))) + r")(?!\w)")
    found, stale = [], []
    for path in sorted(PIPELINE.rglob("*.py")):
        strings, calls = _strings_and_key_calls(path)
        found += [f"{path.name}:{line}: {m.group(0)}" for text, line in strings for m in spelled.finditer(text)]
        for section, name, line in calls:
            if isinstance(getattr(pipeline.config, section, None), type):
                try:
                    getattr(pipeline.config, section).key(name)
                except AttributeError as exc:
                    stale.append(f"{path.name}:{line}: {exc}")
    assert not found, "use Section.key(field) rather than spelling the key"
    assert not stale
    assert len(keys) > 30  # the check looks for every key of every section


def test_a_date_in_a_yaml_file_is_its_text(tmp_path):
    (tmp_path / "dated.yaml").write_text("run:\n  output: 2024-01-01\n")
    assert load_config(tmp_path / "dated.yaml").run.output == "2024-01-01"


@pytest.mark.parametrize("text, message", [
    ("model:\n  kwargs: !!set {a}\n", "model.kwargs: a set ({'a'}) cannot be stored in the dump's manifest; give text, "
                                      "a number, a boolean, null, a list or a mapping"),
    ("model:\n  kwargs: {when: !!timestamp 2024-01-01}\n", "model.kwargs.when: a date (datetime.date(2024, 1, 1))"),
    ("model:\n  kwargs: {x: !!binary aGk=}\n", "model.kwargs.x: a bytes (b'hi')"),
    ("model:\n  kwargs: {x: [1, .nan]}\n", "model.kwargs.x[1]: NaN cannot be compared with a rerun's value"),
    ("model:\n  kwargs: &a {x: *a}\n", "model.kwargs.x: holds itself (a YAML alias to a mapping or list it is in)"),
    ("model:\n  kwargs: {names: {1: a, '1': b}}\n", "model.kwargs.names: the keys 1 and '1' are one key, '1', in the "
                                                    "dump's manifest (JSON writes keys as text); keep one"),
    ("model:\n  kwargs: {flags: {true: a, 'true': b}}\n", "model.kwargs.flags: the keys True and 'true' are one key"),
])
def test_a_value_no_manifest_can_hold_is_refused_naming_its_key(tmp_path, text, message):
    """The config is kept in the dump's manifest as JSON and compared with a rerun's: a value that
    JSON cannot hold, or that equals nothing (NaN), would fail the run late or stop every rerun."""
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "c.yaml")
    assert str(info.value).startswith(message)
    key, value = text.split("\n")[1].strip().split(": ", 1)
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"model.{key}={value}"])
    assert str(info.value).startswith(message)


def test_number_keys_become_text_as_json_writes_them(tmp_path):
    (tmp_path / "c.yaml").write_text("source: {kind: dataset, target: 'x:y', kwargs: {labels: {0: cat, 1: dog}}}\n")
    assert load_config(tmp_path / "c.yaml").source.kwargs == {"labels": {"0": "cat", "1": "dog"}}


def test_an_empty_section_takes_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\nrun:\n")
    assert load_config(tmp_path / "c.yaml", ["run.batch_size=3"]).run.batch_size == 3


@pytest.mark.parametrize("override, message", [
    ("model.seed=18446744073709551616", "model.seed: must be at most 18,446,744,073,709,551,615, got "
                                        "18,446,744,073,709,551,616"),  # torch's largest seed is 2**64 - 1
    ("source.preprocess.resize=1", "source.preprocess.resize: must be at least 2, got 1"),
    ("source.count=9223372036854775808", "source.count: must be at most 9,223,372,036,854,775,807, got "
                                         "9,223,372,036,854,775,808"),  # sample indices are int64
])
def test_values_torch_cannot_take_are_refused(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == message


def test_auto_is_taken_in_any_case():
    config = Config.from_dict({"run": {"actors": "Auto", "gpus_per_actor": "AUTO", "cpus_per_actor": " auto"}})
    assert (config.run.actors, config.run.gpus_per_actor, config.run.cpus_per_actor) == ("auto",) * 3
