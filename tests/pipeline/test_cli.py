"""The command line, through its exit codes and what it prints."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import read_layer
from pipeline.cli import _parser, main
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_bad_config_exits_2_naming_the_key(tmp_path, capsys):
    assert main(["run", "--set", "run.batch_size=0", "--set", f"run.output={tmp_path}"]) == 2
    assert "actmap: error: run.batch_size: must be at least 1, got 0" in capsys.readouterr().err


def test_unknown_layer_exits_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "--set", "model.name=support.models:tiny", "--set", "model.layers=[relu3]",
                 "--set", f"run.output={out}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "model.layers" in err and "relu3" in err and "relu1" in err
    assert not out.exists()


def test_an_unknown_layer_with_no_close_name_is_told_how_to_list_them_from_the_command_line(tmp_path, capsys):
    assert main(["run", "--set", "model.name=support.models:tiny", "--set", "model.layers=['5']",
                 "--set", f"run.output={tmp_path / 'out'}"]) == 2
    said = "actmap: error: model.layers: Unknown layer id '5' in TinyConvNet; `actmap layers MODEL` lists the valid ids"
    assert said in capsys.readouterr().err


def test_unknown_model_suggests(capsys, tmp_path):
    assert main(["run", "--set", "model.name=resnet5", "--set", f"run.output={tmp_path}/o"]) == 2
    assert "model.name: 'resnet5' is not a torchvision model; did you mean 'resnet50'" in capsys.readouterr().err


def test_missing_config_file(capsys):
    assert main(["run", "nope.yaml"]) == 2
    assert "config file 'nope.yaml' does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("make, said", [(lambda p: p.write_bytes(b"# r\xe9sum\xe9\nrun: {}\n"), "is not UTF-8 text"),
                                        (lambda p: p.mkdir(), "is a folder; give a YAML file"),
                                        (lambda p: p.write_text("run: {}\nrun: {}\n"), "the key 'run' is given twice")],
                         ids=["latin-1", "folder", "key-twice"])
def test_a_config_file_that_cannot_be_used_exits_2(tmp_path, capsys, make, said):
    make(tmp_path / "c.yaml")
    assert main(["run", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"actmap: error: config file '{tmp_path / 'c.yaml'}'" in err and said in err and "resume" not in err


def test_a_selector_that_fits_no_output_exits_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "--set", "model.name=support.models:tiny", "--set", "model.layers=['conv2[0]']",
                 "--set", "source.count=4", "--set", "run.executor=local", "--set", f"run.output={out}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "actmap: error: model.layers: Layer id 'conv2[0]': the output of 'conv2' is" in err
    assert "resume" not in err and not out.exists()


@pytest.mark.parametrize("size, said", [(["0"], "every size must be at least 1, got 0"),
                                        (["3", "-3", "8"], "every size must be at least 1, got 3 -3 8"),
                                        (["5", "16", "16"], "the model's forward fails on an input of size 5x16x16: ")])
def test_layers_refuses_an_input_size_the_model_cannot_take(capsys, size, said):
    assert main(["layers", "support.models:tiny", "--input-size", *size]) == 2
    assert f"actmap: error: --input-size: {said}" in capsys.readouterr().err


@pytest.mark.parametrize("model, layers, said", [
    ("support.models:failing", "relu1", "model.name: support.models:failing(**{}) failed: KeyError: \"missing config key 'depth'\""),
    ("support.models:importing", "relu1", "model.name: support.models:importing(**{}) failed: ModuleNotFoundError: "),
    ("support.models:lazy", "relu", "model.name: 'support.models:lazy' built a model with lazy modules, conv (LazyConv2d)"),
    ("support.models:loose", "[relu1,spare]", "model: a trial forward of sample '0' failed: layer 'spare' did not run in the forward"),
    ("support.models:sized", "relu1", "model: a trial forward of sample '0' failed: AssertionError: input (16, 16) "
                                      "is not 32x32 (its input was 3x16x16"),
], ids=["builder-KeyError", "builder-ImportError", "lazy", "never-runs", "forward-assert"])
def test_a_model_mistake_exits_2_before_any_work(tmp_path, capsys, model, layers, said):
    """A mistake of the model's, which a rerun meets again, is a config error: exit 2, no
    "rerun to resume", nothing written."""
    out = tmp_path / "out"
    code = main(["run", "--set", f"model.name={model}", "--set", f"model.layers={layers}", "--set", "source.count=4",
                 "--set", "source.image_size=16", "--set", "run.executor=local", "--set", f"run.output={out}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"actmap: error: {said}" in err
    assert "resume" not in err and not out.exists()


@pytest.mark.parametrize("args, said", [
    (["support.models:sized", "--input-size", "3", "16", "16"],
     "--input-size: the model's forward fails on an input of size 3x16x16: AssertionError: input (16, 16) is not 32x32; "
     "give a size it takes"),
    (["support.models:failing"], "model.name: support.models:failing(**{}) failed: KeyError: "),
    (["support.models:lazy", "--input-size", "3", "16", "16"], "model.name: 'support.models:lazy' built a model with lazy"),
], ids=["forward-assert", "builder-KeyError", "lazy"])
def test_layers_of_a_model_mistake_exits_2(capsys, args, said):
    assert main(["layers", *args]) == 2
    assert f"actmap: error: {said}" in capsys.readouterr().err


def test_layers_lists_ids_and_shapes(capsys):
    assert main(["layers", "support.models:tiny", "--input-size", "3", "16", "16"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "(1, 16, 8, 8)" in rows["conv2"] and "Conv2d" in rows["conv2"]
    assert "(1, 4)" in rows["fc"]
    assert main(["layers", "resnet18", "--set", "num_classes=3"]) == 0
    assert "layer4.1.conv2" in capsys.readouterr().out


def test_inspect_of_nothing_exits_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no dump there" in capsys.readouterr().err


def test_inspect_of_a_folder_that_is_no_dump_exits_2(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"an image")
    assert main(["inspect", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert "holds no actmap dump (no _actmap/manifest.json)" in captured.err
    assert "INCOMPLETE" not in captured.out + captured.err


def test_inspect_refuses_a_negative_count_of_bad_samples(tmp_path, capsys):
    assert main(["inspect", str(tmp_path), "--bad", "-1"]) == 2
    assert "actmap: error: --bad: must be at least 0 (how many bad samples to list; 0 lists none), got -1" in \
        capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(cmd in out for cmd in ("run", "layers", "inspect"))


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_help_and_a_bad_config_answer_before_torch_is_imported(tmp_path):
    """torch takes seconds to import: ``actmap --help`` and a config's mistake do not wait for it."""
    (tmp_path / "bad.yaml").write_text("run:\n  batch_sise: 3\n")
    done = _python("import sys; from pipeline.cli import main\n"
                   "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                   f"print('status', main(['run', {str(tmp_path / 'bad.yaml')!r}]), 'torch' in sys.modules)")
    assert "usage: actmap" in done.stdout and done.stdout.rstrip().endswith("status 2 False"), done.stderr
    assert "run.batch_sise: unknown key; did you mean 'batch_size'?" in done.stderr


def test_an_interrupt_while_torch_is_imported_says_interrupted():
    """Ctrl-C in the seconds the run's modules take to import ends as any interrupt does: a line
    that says so and status 130, no traceback."""
    done = _python("import sys\n"
                   "class Interrupted:\n"
                   "    def find_spec(self, name, path=None, target=None):\n"
                   "        if name == 'pipeline._driver':\n"
                   "            raise KeyboardInterrupt\n"
                   "sys.meta_path.insert(0, Interrupted())\n"
                   "from pipeline.cli import main\n"
                   "sys.exit(main(['run', '--set', 'source.count=4']))")
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "actmap: interrupted; rerun the same command to resume"


@pytest.mark.parametrize("status, args", [(0, ["layers", "support.models:tiny", "--input-size", "3", "16", "16"]),
                                          (2, ["layers", "support.models:nothing_here"])])
def test_the_command_exits_with_mains_status_its_objects_frozen(status, args):
    """``actmap`` and ``python -m pipeline`` run :func:`main` and exit with its status, the objects
    left frozen so that the interpreter's last collection skips them."""
    probe = ("import atexit, gc, sys; atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0)); "
             "from pipeline.cli import command; sys.argv[1:] = " + repr(args) + "; command()")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == status, done.stderr
    assert done.stdout.rstrip().endswith("frozen True")
    if status == 0:
        assert "relu1" in done.stdout
    module = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    assert module.returncode == status and module.stdout == done.stdout.rsplit("frozen", 1)[0]


def test_a_ctrl_c_once_the_run_is_over_leaves_its_exit_status():
    # (it came as the process froze its objects: it died by the signal, with a traceback)
    probe = ("import gc, os, signal, sys; freeze = gc.freeze\n"
             "def late():\n    os.kill(os.getpid(), signal.SIGINT); os.kill(os.getpid(), signal.SIGTERM); freeze()\n"
             "gc.freeze = late\n"
             "from pipeline.cli import command; sys.argv[1:] = ['layers', 'support.models:tiny']; command()")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "relu1" in done.stdout


def test_modules_of_the_working_folder_and_pythonpath_reach_the_actors_of_a_ray_started_here(tmp_path):
    """A local Ray's workers import what the driver can: the working folder's modules (Ray puts
    it on their path) and PYTHONPATH's (they inherit the driver's environment)."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "settings.py").write_text("CHANNELS = 4\n")  # in the working folder
    (tmp_path / "lib" / "my_model.py").write_text(  # on PYTHONPATH
        "import torch\n"
        "from settings import CHANNELS\n\n"
        "def build():\n"
        "    model = torch.nn.Sequential()\n"
        "    model.add_module('conv', torch.nn.Conv2d(3, CHANNELS, 3))\n"
        "    return model\n")
    config = {"model": {"name": "my_model:build", "layers": ["conv"]},
              "source": {"kind": "generated", "count": 8, "image_size": 16},
              "run": {"output": str(tmp_path / "out"), "batch_size": 4, "shard_size": 4, "actors": 1,
                      "executor": "ray"}}
    (tmp_path / "dump.yaml").write_text(json.dumps(config))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path / "lib")])
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "dump.yaml"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "on 1 actor(s)" in done.stderr + done.stdout
    assert read_layer(str(tmp_path / "out"), "conv").shape == (8, 4, 14, 14)


@pytest.mark.parametrize("stopped, status, said", [
    (KeyboardInterrupt, 130, "actmap: interrupted; rerun the same command to resume"),
    # Ray's own SIGTERM handler, in place while ray.init runs, exits with the signal's number
    (lambda: SystemExit(15), 143, "actmap: terminated (SIGTERM); rerun the same command to resume"),
])
def test_an_interrupted_run_says_what_stopped_it(tmp_path, capsys, monkeypatch, stopped, status, said):
    import signal

    import pipeline._driver
    import pipeline.cli

    def run(*args, **kwargs):
        raise stopped()

    monkeypatch.setattr(pipeline._driver, "run", run)
    pipeline.cli._TERMINATED.set()  # left by an earlier run in this process: no longer counts
    before = signal.getsignal(signal.SIGTERM)  # (Ray's, where a test before started a Ray in this process)
    assert main(["run", "--set", f"run.output={tmp_path / 'out'}"]) == status
    assert said in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # the run's own handler is gone


@pytest.mark.parametrize("level", ["nonsense", "5x"])
def test_a_bad_log_level_exits_2_naming_the_valid_ones(capsys, level):
    with pytest.raises(SystemExit) as info:
        main(["--log-level", level, "inspect", "x"])
    assert info.value.code == 2
    assert f"argument --log-level: '{level}' is no logging level; give DEBUG, INFO" in capsys.readouterr().err


def test_a_log_level_by_number_or_in_any_case_is_taken(tmp_path, capsys):
    assert main(["--log-level", "10", "inspect", str(tmp_path)]) == main(["--log-level", "info", "inspect", str(tmp_path)]) == 2
    assert "is empty or does not exist: no dump there" in capsys.readouterr().err


@pytest.mark.parametrize("args, level", [(["inspect", "x"], 30), (["--log-level", "info", "inspect", "x"], 20),
                                         (["inspect", "x", "--log-level", "debug"], 10),
                                         (["--log-level", "info", "run", "c.yaml", "--log-level", "debug"], 10)])
def test_the_log_level_is_taken_before_or_after_the_command(args, level):
    assert _parser().parse_args(args).log_level == level


def test_inspect_of_a_file_exits_2(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["inspect", str(tmp_path / "afile")]) == 2
    assert f"actmap: error: output: '{tmp_path / 'afile'}' is a file, not a folder" in capsys.readouterr().err


def test_layers_refuses_an_input_too_large_to_make_before_making_it(capsys):
    assert main(["layers", "support.models:tiny", "--input-size", "3", "100000", "100000"]) == 2
    assert ("--input-size: an input of 3x100000x100000 is 30,000,000,000 values, 112 GiB of float32: more than "
            "this command tries") in capsys.readouterr().err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc, where no folder can be made")
def test_an_output_folder_that_cannot_be_made_exits_2_before_any_work(capsys):
    assert main(["run", "--set", "run.executor=local", "--set", "source.count=4",
                 "--set", "run.output=/proc/actmap-cannot/out"]) == 2
    err = capsys.readouterr().err
    assert "actmap: error: run.output: cannot write in '/proc/actmap-cannot/out'" in err
    assert "choose a folder this process may create and write in" in err and "resume" not in err


def test_the_summary_quotes_an_output_path_with_spaces(tmp_path, capsys):
    out = tmp_path / "my dump"
    assert main(["run", "--quiet", "--set", "run.executor=local", "--set", "source.count=4", "--set",
                 "source.image_size=16", "--set", "model.name=support.models:tiny", "--set", "model.layers=[conv2]",
                 "--set", f"run.output={out}"]) == 0
    assert f"`actmap inspect '{out}'` describes the dump" in capsys.readouterr().err


@pytest.mark.parametrize("text, holds", [("0\n", "0"), ("false\n", "False"), ("''\n", "''"), ("[]\n", "[]")])
def test_a_config_file_of_a_value_that_is_no_mapping_exits_2(tmp_path, capsys, text, holds):
    (tmp_path / "c.yaml").write_text(text)  # (it ran the default job, as an empty file does)
    assert main(["run", str(tmp_path / "c.yaml")]) == 2
    assert f"must hold a mapping with the sections model, source, dump, run; it holds {holds}" in capsys.readouterr().err


def test_an_empty_config_file_or_one_of_comments_is_the_defaults(tmp_path):
    for text in ("", "# nothing here\n"):
        (tmp_path / "c.yaml").write_text(text)
        assert load_config(tmp_path / "c.yaml") == load_config()


@pytest.mark.parametrize("value, said", [
    ("6e2", "run.start_timeout: expected a finite number, got '6e2' (YAML reads 6e2 as text: write 600.0)"),
    ("1.0e20", "run.start_timeout: expected a finite number, got '1.0e20' (YAML reads 1.0e20 as text: write 1.0e+20)"),
])
def test_a_number_yaml_reads_as_text_is_told_how_to_write_it(tmp_path, capsys, value, said):
    # (YAML 1.1 reads exponents without a dot or a sign as text; reading them as numbers would
    # change the identity of dumps whose model or source kwargs hold such text)
    assert main(["run", "--set", f"run.start_timeout={value}", "--set", "run.executor=local"]) == 2
    assert f"actmap: error: {said}" in capsys.readouterr().err


def test_a_wait_too_long_for_ray_exits_2(capsys):
    # (Ray's waits turn seconds into milliseconds as a C long: 1e20 s failed the run, exit 1, at its start)
    assert main(["run", "--set", "run.start_timeout=1.0e+20", "--set", "run.executor=local"]) == 2
    assert "actmap: error: run.start_timeout: must be at most 3.1536e+07, got 1e+20" in capsys.readouterr().err


def test_an_output_in_a_filesystem_of_memory_exits_2(capsys):
    assert main(["run", "--set", "run.output=mock://x", "--set", "run.executor=local", "--set", "source.count=4"]) == 2
    assert "actmap: error: run.output: 'mock://x' is pyarrow's in-memory filesystem" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["inspect"], ["show", "--stats"]])
def test_inspect_and_show_of_a_location_no_filesystem_opens_exit_2(capsys, command):
    assert main([*command, "foo://x"]) == 2
    assert "actmap: error: output: cannot use 'foo://x'" in capsys.readouterr().err


def test_show_of_a_damaged_dump_exits_3(tmp_path, capsys):
    out = tmp_path / "dump"
    shutil.copytree(ROOT / "tests" / "pipeline" / "fixtures" / "dump-0.1.0" / "generated", out)
    (out / "_actmap" / "manifest.json").write_text('{"format": "actmap.manif')
    assert main(["show", str(out), "--stats", "-o", str(tmp_path / "s.png")]) == 3
    assert "actmap: damaged: " in capsys.readouterr().err and not (tmp_path / "s.png").exists()


def test_the_actmap_command_imports_the_working_folders_modules(tmp_path):
    (tmp_path / "mymodels.py").write_text("import torch\n\ndef tiny():\n    return torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3))\n")
    script = Path(sys.executable).with_name("actmap")
    assert script.exists(), "the actmap command is installed with the package"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(script), "layers", "mymodels:tiny", "--input-size", "3", "8", "8"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Conv2d      (1, 2, 6, 6)" in done.stdout, done.stdout


def test_a_ray_address_at_which_nothing_answers_exits_2_at_once(tmp_path):
    """ray.init retried such an address for minutes, saying nothing of ours."""
    # (in a process of its own: one with Ray already up uses that Ray, whatever the address)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "--set", "run.executor=ray", "--set",
                           f"run.output={tmp_path / 'out'}", "--address", "127.0.0.1:1"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < 120
    assert "actmap: error: --address: nothing answers at '127.0.0.1:1' (ConnectionRefusedError: " in done.stderr
    assert not (tmp_path / "out").exists()


def test_an_output_inside_the_folder_the_source_reads_exits_2(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "images" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a" / "0.png")
    (tmp_path / "link").symlink_to(tmp_path / "images")  # (either path through a link to the other's folder)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "images" / "more").symlink_to(tmp_path / "elsewhere")  # (a link the source follows)
    for source, output in [(tmp_path / "images", tmp_path / "images" / "out"), (tmp_path / "images", tmp_path / "images"),
                           (tmp_path / "images", tmp_path / "link" / "out"), (tmp_path / "link", tmp_path / "images" / "out"),
                           (tmp_path / "images", tmp_path / "images" / "more" / "out")]:
        code = main(["run", "--set", "source.kind=folder", "--set", f"source.path={source}",
                     "--set", "run.executor=local", "--set", f"run.output={output}"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"actmap: error: run.output: '{output}' lies inside the folder the source reads (source.path: " in err
        assert not (tmp_path / "images" / "out").exists()
    # a hidden folder, which the source passes over, may hold it
    assert main(["run", "--set", "source.kind=folder", "--set", f"source.path={tmp_path / 'images'}",
                 "--set", "run.executor=local", "--set", "model.name=support.models:tiny",
                 "--set", "model.layers=[conv2]", "--set", f"run.output={tmp_path / 'images' / '.dump'}"]) == 0


@pytest.mark.parametrize("args, said", [
    (["run", ""], "actmap: error: the config file's name is empty"),
    (["show", "x", "--stats", "-o", ""], "actmap: error: -o/--out: is empty"),
    (["show", "x", "--layer", "l", "--prefix-tokens", "-1"], "actmap: error: --prefix-tokens: must be at least 0"),
])
def test_empty_names_and_negative_counts_exit_2(capsys, args, said):
    assert main(args) == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize("layer, said", [("rnn[1]", "a 1x2x8 tensor for 2 inputs"),
                                         ("rnn[0]", "a 16x1x8 tensor for 1 input")])
def test_a_layer_whose_first_dim_is_not_the_batch_exits_2_before_any_work(tmp_path, capsys, layer, said):
    out = tmp_path / "out"
    code = main(["run", "--set", "model.name=support.models:recurrent", "--set", f"model.layers=['{layer}']",
                 "--set", "source.image_size=16", "--set", "source.count=8", "--set", "run.executor=local",
                 "--set", f"run.output={out}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"layer '{layer}' gives {said}: its first dim is not the batch's" in err
    assert not out.exists()


def test_cls_of_a_model_without_a_class_token_exits_2(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["run", "--set", "model.name=timm:vit_tiny_patch16_224", "--set", "model.layers=[blocks.0]",
                 "--set", "model.kwargs={class_token: false, global_pool: avg, img_size: 32, num_classes: 0}",
                 "--set", "dump.reduce=cls", "--set", "source.image_size=32", "--set", "source.count=4",
                 "--set", "run.executor=local", "--set", f"run.output={out}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "actmap: error: dump.reduce: 'cls' keeps token 0, the class token, but the model has none" in err
    assert not out.exists()


def test_a_model_that_takes_one_input_at_a_time_runs_in_batches_of_one_and_is_told_so_otherwise(tmp_path, capsys):
    args = ["run", "--set", "model.name=support.models:one_at_a_time", "--set", "model.layers=[fc]",
            "--set", "source.image_size=8", "--set", "source.count=4", "--set", "run.executor=local"]
    assert main([*args, "--set", "run.batch_size=4", "--set", f"run.output={tmp_path / 'four'}"]) == 2
    assert ("actmap: error: run.batch_size: the model takes sample '0' alone but fails on a batch of two ("
            in capsys.readouterr().err)
    assert main([*args, "--set", "run.batch_size=1", "--set", f"run.output={tmp_path / 'one'}"]) == 0
    assert read_layer(str(tmp_path / "one"), "fc").shape == (4, 3)
