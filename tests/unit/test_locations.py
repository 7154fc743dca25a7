"""The early checks of `axolotl_xkd.locations` and `args.check_base_url`: each wrong place is an error that names
the key it came from and says what to do; right ones (a folder, a cached hub id, a store) pass."""

from __future__ import annotations

import pytest
from huggingface_hub import constants

from axolotl_xkd.args import check_base_url
from axolotl_xkd.locations import check_data_files, check_model_location, check_store, check_teacher


def test_a_model_folder_passes(tmp_path):
    check_model_location(str(tmp_path), "xkd.teacher.path")


@pytest.mark.parametrize("value", ["/no/such/teacher", "runs/tiny/no/teacher", "~/teacher", "./teacher"])
def test_a_missing_folder_that_is_no_hub_id_names_the_key(value):
    """The reported bug: such a path reached from_pretrained, which said "Repo id must be in the form ...", after
    the dataset was prepared and the student loaded."""
    with pytest.raises(ValueError, match=r"^xkd\.teacher\.path=.* is not a folder on this machine") as info:
        check_model_location(value, "xkd.teacher.path")
    assert "point it at the model's folder" in str(info.value)
    assert ("~ is not expanded" in str(info.value)) == value.startswith("~")


def test_a_file_is_not_a_model(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="--model=.* is a file"):
        check_model_location(str(tmp_path / "model.safetensors"), "--model")


def test_an_uncached_hub_id_offline_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=r"xkd\.teacher\.tokenizer_path='org/teacher' .* HF_HUB_OFFLINE is set"):
        check_model_location("org/teacher", "xkd.teacher.tokenizer_path")


def test_a_cached_hub_id_offline_passes(tmp_path, monkeypatch):
    """The hub cache's layout: models--ORG--NAME/snapshots/REVISION/..."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = tmp_path / "models--org--teacher" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    check_model_location("org/teacher", "xkd.teacher.path")


def test_a_hub_id_online_is_left_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    check_model_location("org/teacher", "xkd.teacher.path")


def test_a_store_needs_its_manifest(tmp_path):
    with pytest.raises(ValueError, match=r"xkd\.teacher\.path=.* has no manifest\.json.*axolotl xkd precompute"):
        check_store(str(tmp_path), "xkd.teacher.path", store_format="xkd")
    with pytest.raises(ValueError, match=r"xkd\.teacher\.path=.* is not a folder"):
        check_store(str(tmp_path / "missing"), "xkd.teacher.path", store_format="xkd")
    (tmp_path / "manifest.json").write_text("{}")
    check_store(str(tmp_path), "xkd.teacher.path", store_format="xkd")


def test_a_kd_v2_dataset_must_exist(tmp_path):
    with pytest.raises(ValueError, match=r"xkd\.teacher\.path=.* \(format axolotl_kd_v2\) does not exist"):
        check_store(str(tmp_path / "kd.jsonl"), "xkd.teacher.path", store_format="axolotl_kd_v2")
    (tmp_path / "kd.jsonl").write_text("")
    check_store(str(tmp_path / "kd.jsonl"), "xkd.teacher.path", store_format="axolotl_kd_v2")


def test_check_teacher_reads_what_the_run_reads(tmp_path):
    """`axolotl preprocess` reads a store (it is the data) but never the teacher model; a server of another tokenizer
    is read through its tokenizer_path when training."""
    from axolotl_xkd.args import ModelTeacher, PrecomputedTeacher, ServerTeacher

    model = ModelTeacher(path=str(tmp_path / "missing"))
    check_teacher(model, training=False)
    with pytest.raises(ValueError, match=r"xkd\.teacher\.path="):
        check_teacher(model, training=True)
    with pytest.raises(ValueError, match=r"xkd\.teacher\.tokenizer_path="):
        check_teacher(ModelTeacher(path=str(tmp_path), tokenizer_path=str(tmp_path / "tok")), training=True)
    with pytest.raises(ValueError, match=r"xkd\.teacher\.path=.* has no manifest"):
        check_teacher(PrecomputedTeacher(path=str(tmp_path)), training=False)
    server = ServerTeacher(base_url="http://127.0.0.1:8000", cross_tokenizer=True, tokenizer_path=str(tmp_path / "t"))
    check_teacher(server, training=False)
    with pytest.raises(ValueError, match=r"xkd\.teacher\.tokenizer_path="):
        check_teacher(server, training=True)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [("127.0.0.1:8000", "must start with http"), ("http://", "names no host"), ("http://:8000", "names no host"),
     ("http://host:port", "port that is not a number"), ("http://host:8000/?model=t", "server root")],
)
def test_a_malformed_server_url_names_the_key(url, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        check_base_url(url, "--server")
    assert str(info.value).startswith(f"--server={url!r}")


def test_a_server_root_passes():
    check_base_url("http://127.0.0.1:8000", "xkd.teacher.base_url")
    check_base_url("https://teacher.example.com/serving", "xkd.teacher.base_url")


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_a_data_file_without_rows_names_the_key_and_the_file(tmp_path, text):
    """Issue 35: an empty .jsonl under datasets: ended in the JSON loader's bare StopIteration."""
    rows, empty = tmp_path / "rows.jsonl", tmp_path / "empty.jsonl"
    rows.write_text('{"prompt": "1+1=", "response": "2"}\n')
    empty.write_text(text)
    cfg = {"datasets": [{"path": str(rows)}], "test_datasets": [{"path": "org/hub-dataset"}, {"path": str(empty)}]}
    with pytest.raises(ValueError, match=rf"test_datasets\[1\].path='{empty}' is empty: it holds no rows. Write"):
        check_data_files(cfg)
    check_data_files({"datasets": [{"path": str(rows)}], "test_datasets": None})
