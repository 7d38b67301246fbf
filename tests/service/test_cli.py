"""`disa submit` exit codes: 2 when the input is at fault, 1 when the service is."""

from __future__ import annotations

import threading

from disa.cli import main
from disa.jobs.settings import get_settings
from disa.jobs.store import JobStore
from disa.service import runtime as runtime_module
from disa.service.app import create_app
from disa.service.client import DisaClient
from disa.worker.execute import execute_job

from ..support import free_port, wait_until
from .conftest import RecordingDispatcher
from .helpers import LiveServer, service_env, using_env


def test_unreachable_service_exits_1_with_one_line(pair_files, capsys):
    port = free_port()  # nothing listens there
    code = main(["submit", str(pair_files[0]), str(pair_files[1]), "--url",
                 f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err == f"disa: error: cannot reach http://127.0.0.1:{port}: ConnectError\n"


def test_a_job_given_up_on_exits_1_not_as_bad_input(pair_files, tmp_path, monkeypatch,
                                                    capsys):
    """The job's workers were lost until its attempts ran out: the service failed, not the
    input. The worker function itself ends the job while `disa submit --wait` polls."""
    dispatcher = RecordingDispatcher()
    monkeypatch.setattr(runtime_module, "make_dispatcher", lambda store, settings: dispatcher)
    env = service_env(tmp_path / "jobs", broker_url="redis://unused:1/0", max_attempts=2,
                      sweep_interval_s=3600)
    with using_env(env), LiveServer(create_app(), free_port()) as server:
        settings = get_settings()
        store = JobStore(settings.jobs_dir)

        def lost_twice_then_given_up() -> None:
            (job_id,) = wait_until(lambda: dispatcher.sent, 60, "the submission")
            try:
                with store.lock(job_id) as lock:
                    assert lock.acquire(timeout=5)
                    m = store.read(job_id)
                    m.state, m.attempts = "running", settings.max_attempts
                    store.write(m)
                execute_job(store, job_id, settings)
            finally:
                if store.read(job_id).state != "failed":
                    store.delete(job_id)  # polling then ends (404) rather than hangs

        worker = threading.Thread(target=lost_twice_then_given_up)
        worker.start()
        code = main(["submit", str(pair_files[0]), str(pair_files[1]), "--url", server.url,
                     "--wait", "--quiet", "--poll", "0.1"])
        worker.join(30)
        err = capsys.readouterr().err
        assert code == 1, err
        assert len(err.splitlines()) == 1 and "failed: gave up after 2 attempts" in err
        with DisaClient(server.url) as client:
            job = client.job(dispatcher.sent[0])
        assert job["error_kind"] == "internal"


def test_an_hdf5_initial_transform_exits_2_before_contacting_the_service(pair_files, tmp_path,
                                                                          capsys):
    port = free_port()  # nothing listens there: reaching it would exit 1, not 2
    code = main(["submit", str(pair_files[0]), str(pair_files[1]), "--url",
                 f"http://127.0.0.1:{port}", "--initial-transform", str(tmp_path / "pose.h5")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(
        "disa: error: initial transform (pose.h5): the service takes ITK text transforms"), err


def _keyed_server(tmp_path, monkeypatch):
    from .helpers import api_key_env

    monkeypatch.setattr(runtime_module, "make_dispatcher",
                        lambda store, settings: RecordingDispatcher())
    env = {**service_env(tmp_path / "jobs", broker_url="redis://unused:1/0",
                         sweep_interval_s=3600), **api_key_env()}
    return env


def test_submit_reads_the_key_from_a_file_or_the_environment(pair_files, tmp_path,
                                                             monkeypatch, capsys):
    from .helpers import API_KEY, OTHER_KEY

    key_file = tmp_path / "key"
    key_file.write_text(f"{OTHER_KEY}\n")
    with using_env(_keyed_server(tmp_path, monkeypatch)), \
            LiveServer(create_app(), free_port()) as server:
        submit = ["submit", str(pair_files[0]), str(pair_files[1]), "--url", server.url]
        monkeypatch.delenv("DISA_API_KEY", raising=False)
        monkeypatch.delenv("DISA_API_KEY_FILE", raising=False)
        assert main([*submit, "--api-key-file", str(key_file)]) == 0
        monkeypatch.setenv("DISA_API_KEY_FILE", str(key_file))
        assert main(submit) == 0
        monkeypatch.delenv("DISA_API_KEY_FILE")
        monkeypatch.setenv("DISA_API_KEY", API_KEY)
        assert main(submit) == 0
        out, err = capsys.readouterr()
        assert err == "" and out.count(" queued\n") == 3
        with DisaClient(server.url, api_key=OTHER_KEY) as client:
            assert client.jobs()["total"] == 2  # the key file's key owns two of them
        monkeypatch.delenv("DISA_API_KEY")
        assert main(submit) == 2  # no key at all: the service refuses (401)
        assert "missing API key" in capsys.readouterr().err


def test_submit_warns_when_the_key_is_on_the_command_line(pair_files, tmp_path, monkeypatch,
                                                          capsys):
    from .helpers import API_KEY

    with using_env(_keyed_server(tmp_path, monkeypatch)), \
            LiveServer(create_app(), free_port()) as server:
        code = main(["submit", str(pair_files[0]), str(pair_files[1]), "--url", server.url,
                     "--api-key", API_KEY])
    out, err = capsys.readouterr()
    assert code == 0 and " queued" in out
    assert err == ("disa: warning: --api-key shows the key to other users of this machine "
                   "(process list) and leaves it in the shell history; use DISA_API_KEY or "
                   "--api-key-file\n")


def test_an_unreadable_or_empty_key_file_exits_2_before_contacting_the_service(
        pair_files, tmp_path, capsys):
    port = free_port()  # nothing listens there: reaching it would exit 1, not 2
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for path, words in ((tmp_path / "missing", "No such file or directory"),
                        (empty, "holds no key (one line, the key)")):
        code = main(["submit", str(pair_files[0]), str(pair_files[1]), "--url",
                     f"http://127.0.0.1:{port}", "--api-key-file", str(path)])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err == f"disa: error: API key file {path}: {words}\n"
