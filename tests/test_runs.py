"""Run-directory helpers: atomic writes, outputs that would replace something, damaged JSON, JSONL cut by a kill."""
import json

import pytest

from gptjax import runs


def test_an_atomic_write_killed_midway_leaves_the_old_file_and_nothing_else(tmp_path):
    path = tmp_path / "samples.json"
    runs.write_json_atomic(path, [{"epoch": 1, "text": "old"}])

    def killed(tmp):
        tmp.write_text('[{"epoch": 1, "te')  # half of it on disk, then the process is stopped
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runs.write_atomic(path, killed)
    assert json.loads(path.read_text()) == [{"epoch": 1, "text": "old"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.json"]
    runs.write_atomic(tmp_path / "w.bin", lambda tmp: tmp.write_bytes(b"x"), mode=0o644)
    assert (tmp_path / "w.bin").stat().st_mode & 0o777 == 0o644


def test_a_plot_is_written_whole_under_its_own_name(tmp_path):
    runs.plot_curves([0, 1, 2], {"Training loss": [3.0, 2.0, 1.5]}, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png"]


def test_an_existing_output_file_is_refused_unless_overwrite(tmp_path):
    data, out = tmp_path / "answers.json", tmp_path / "scores.json"
    data.write_text("[]")
    assert runs.check_output(out, [data]) == out  # nothing there yet
    out.write_text("{}")
    with pytest.raises(FileExistsError, match=f"--out '{out}' already exists; pass --overwrite to replace it"):
        runs.check_output(out, [data])
    assert runs.check_output(out, [data], overwrite=True) == out
    with pytest.raises(ValueError, match="would overwrite the input"):  # an input stays refused, overwrite or not
        runs.check_output(data, [data], overwrite=True)
    (tmp_path / "hf").mkdir()
    assert runs.check_output(tmp_path / "hf", [data], directory=True) == tmp_path / "hf"  # an empty directory
    (tmp_path / "hf" / "config.json").write_text("{}")  # a directory output that holds something: the same rule
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite to replace it"):
        runs.check_output(tmp_path / "hf", [data], directory=True)
    assert runs.check_output(tmp_path / "hf", [data], directory=True, overwrite=True) == tmp_path / "hf"


def test_a_resumed_run_says_running_again(tmp_path):
    from gptjax.model_io import begin_run

    run = tmp_path / "run"
    begin_run(run, {"model": {}, "instruct": {"data_sha256": "ab"}}, resume=False)
    runs.set_status(run, "interrupted")
    runs.release_run_dir(run)
    begin_run(run, {"model": {}, "instruct": {"data_sha256": "ab"}}, resume=True)
    assert json.loads((run / "config.json").read_text()) == {"model": {}, "instruct": {"data_sha256": "ab"},
                                                             "status": "running"}
    runs.release_run_dir(run)


@pytest.mark.parametrize("text, why", [("", "it is empty"), ('{"model": ', "not JSON: Expecting value"),
                                       ("[1, 2]", "a JSON list, not an object")])
def test_a_damaged_json_file_is_one_error_naming_it(tmp_path, text, why):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^{path} is damaged \\({why}.*\\); restore it$"):
        runs.read_json_object(path, "restore it")


def test_a_jsonl_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "steps.jsonl"
    path.write_text('{"step": 0, "loss": 2.5}\n{"step": 1, "loss": 2.25}\n{"step": 2, "lo')
    assert runs.read_jsonl(path) == [{"step": 0, "loss": 2.5}, {"step": 1, "loss": 2.25}]
    runs.truncate_jsonl(path, 1)
    assert path.read_text() == '{"step": 0, "loss": 2.5}\n'
    path.write_text('{"step": 0, "lo\n{"step": 1}\n')  # damage before the last line is not a kill's: an error
    with pytest.raises(json.JSONDecodeError):
        runs.read_jsonl(path)


def test_the_data_hash_is_canonical():
    a = runs.data_sha256({"train": [{"instruction": "a", "output": "b"}]})
    assert a == runs.data_sha256({"train": [{"output": "b", "instruction": "a"}]})  # key order does not matter
    assert a != runs.data_sha256({"train": [{"instruction": "a", "output": "c"}]})
