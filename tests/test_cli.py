"""Command-line contracts: JSON shape, exit status 2 with one sentence, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_errors import one_sentence

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)



def test_search_json_contract(tiny_index, tiny_model_dir):
    proc = _run("-m", "medfinder", "search", "--index", str(tiny_index), "--model", str(tiny_model_dir),
                "--text", "pleural effusion", "-k", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert isinstance(results, list) and len(results) == 3
    assert all({"case_id", "score"} <= set(r) for r in results)
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)


def test_search_one_channel_and_image(tiny_index, tiny_model_dir, tiny_corpus):
    image = next(tiny_corpus.parent.glob("images/*.nii.gz"))
    proc = _run("-m", "medfinder", "search", "--index", str(tiny_index), "--model", str(tiny_model_dir),
                "--image", str(image), "--channel", "image", "--json", "-k", "2")
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    assert results[0]["case_id"] in image.name and set(results[0]["channels"]) == {"image"}


def test_search_errors(tiny_index, tiny_model_dir, tmp_path):
    one_sentence(_run("-m", "medfinder", "search", "--index", str(tmp_path / "nope"), "--text", "x"),
                        "nope", "does not exist")
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("hello")
    one_sentence(_run("-m", "medfinder", "search", "--index", str(tiny_index), "--model",
                             str(tiny_model_dir), "--image", str(bad)), "bad.nii.gz")
    one_sentence(_run("-m", "medfinder", "search", "--index", str(tiny_index), "--text", "x", "-k", "0"), "-k")
    one_sentence(_run("-m", "medfinder", "search", "--index", str(tiny_index)), "required")
    not_index = tmp_path / "empty_folder"
    not_index.mkdir()
    one_sentence(_run("-m", "medfinder", "search", "--index", str(not_index), "--model",
                             str(tiny_model_dir), "--text", "x"), "empty_folder")


def test_info(tiny_index):
    proc = _run("-m", "medfinder", "info", "--index", str(tiny_index))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["counts"]["cases"] == 12


def test_index_build_cli_adds_then_skips(tiny_corpus, tiny_model_dir, tmp_path):
    out = tmp_path / "idx"
    args = ("-m", "index_build", "--manifest", str(tiny_corpus), "--out", str(out), "--model", str(tiny_model_dir),
            "--quiet")
    first = _run(*args)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["added"] == 12
    again = json.loads(_run(*args).stdout)
    assert again["added"] == 0 and again["skipped_already_indexed"] == 12


@pytest.mark.parametrize("command", ["index_build", "medfinder evaluate", "medfinder.train"])
def test_workers_do_not_need_shared_memory(command, tiny_corpus, tmp_path):
    """A small /dev/shm (64 MB in a default Docker container) once made loading with workers wait for ever.

    The child may write no file larger than half a preprocessed volume. The cap covers the
    shared-memory files torch would pass volumes through, as a full /dev/shm would, and leaves
    room for every file these commands write for 12 tiny cases.
    """
    import torch

    from medfinder.model import create_model_and_transforms, load_config

    config = load_config("medfinder-tiny").to_dict()
    config["preprocess"]["shape"] = [96, 96, 64]
    torch.manual_seed(0)
    model, _ = create_model_and_transforms(config)
    model_dir = model.save_pretrained(tmp_path / "model")
    cap = 2 * 96 * 96 * 64 // 2  # half a volume even as training's cache keeps it, one byte per voxel
    args = {
        "index_build": ["--manifest", str(tiny_corpus), "--out", str(tmp_path / "idx"), "--model", str(model_dir), "--quiet"],
        "medfinder evaluate": ["--model", str(model_dir), "--manifest", str(tiny_corpus), "--split", "all", "--json"],
        "medfinder.train": ["--manifest", str(tiny_corpus), "--out", str(tmp_path / "trained"), "--init", str(model_dir),
                            "--epochs", "1", "--batch-size", "4"],
    }[command]
    # The cap is set inside the child: preexec_fn is not safe in a parent that runs threads (torch does).
    module, *subcommand = command.split()
    capped = (f"import resource, runpy; resource.setrlimit(resource.RLIMIT_FSIZE, ({cap}, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
              f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    proc = subprocess.run([sys.executable, "-c", capped, *subcommand, *args, "--workers", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if command == "index_build":
        assert json.loads(proc.stdout)["added"] == 12
    elif command == "medfinder evaluate":
        assert json.loads(proc.stdout)["text_to_image"]["n"] >= 1


def test_index_build_errors(tmp_path, tiny_model_dir):
    one_sentence(_run("-m", "index_build", "--manifest", str(tmp_path / "none.csv"), "--out",
                             str(tmp_path / "o"), "--model", str(tiny_model_dir)), "none.csv")
    one_sentence(_run("-m", "index_build", "--out", str(tmp_path / "o")), "required")


@pytest.mark.parametrize("error, sentence", [
    (FileNotFoundError(2, "No such file or directory", "/data/a.csv"), "/data/a.csv: no such file or folder."),
    (PermissionError(13, "Permission denied", "/out"), "/out: permission denied."),
    (NotADirectoryError(20, "Not a directory", "/tmp/f/m"), "/tmp/f/m: not a directory."),
    (OSError(28, "No space left on device"), "A file could not be read or written: no space left on device."),
    (FileNotFoundError("gone."), "A file could not be read or written: no such file or folder."),
])
def test_a_file_system_error_is_one_sentence_naming_the_path_when_known(error: OSError, sentence: str) -> None:
    from medfinder.errors import os_error_sentence

    assert os_error_sentence(error) == sentence
