"""Issue 16 items 14-18 and issue 17 item 8: the command line as a newcomer meets it.  One line and exit
status 2 for every mistake, the unreachable server named, Ctrl-C quiet, no torch for --help, help on every
option, one client module shared with the queue commands."""

import argparse
import ast
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.cli import build_parser, main
from tests.queue_fixtures import jobs_server, redis_server, settings
from tests.server_fixtures import gmm_model, pb, running_server

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_help_does_not_import_torch():
    code = "import sys; from server.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


def test_errors_from_a_server_are_one_line(capsys):
    with running_server({"gmm": gmm_model()}) as srv:
        address = f"127.0.0.1:{srv.port}"
        assert main(["generate", "--server", address, "--model", "nope", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("diffserve: error: NOT_FOUND: ") and err.count("\n") == 1, err
        assert main(["generate", "--server", address, "--model", "gmm", "--sampler", "nope", "--quiet"]) == 2
        assert capsys.readouterr().err.startswith("diffserve: error: INVALID_ARGUMENT: sampler")
        assert main(["models", "--server", address, "--token", "x"]) == 0  # no auth on this server
        assert "gmm" in capsys.readouterr().out


def test_an_unreachable_server_is_named(capsys):
    with socket_port() as port:
        for command in (["models"], ["samplers"], ["generate", "--model", "gmm", "--quiet"], ["jobs"]):
            assert main([*command, "--server", f"127.0.0.1:{port}"]) == 2
            err = capsys.readouterr().err
            assert f"127.0.0.1:{port}" in err and "is the server running?" in err and err.count("\n") == 1, err


class socket_port:
    """A loopback port nobody listens on."""

    def __enter__(self):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("flag", ["--n", "--steps", "--budget"])
def test_negative_counts_name_their_flag(flag, capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", "gmm", flag, "-1"])
    assert info.value.code == 2
    assert f"argument {flag}: -1 is not a positive integer" in capsys.readouterr().err


def test_every_option_has_help_and_queue_commands_say_their_default_server():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [f"{name} {action.option_strings or action.dest}" for name, command in commands.items()
               for action in command._actions
               if not isinstance(action, argparse._HelpAction) and not action.help]
    assert missing == []
    for name in ("submit", "job", "jobs", "cancel", "results"):
        server = next(a for a in commands[name]._actions if "--server" in a.option_strings)
        assert server.default == "127.0.0.1:50051" and "127.0.0.1:50051" in server.help
        assert "in-process" not in server.help
    submit = {s for a in commands["submit"]._actions for s in a.option_strings}
    assert {"--search", "--budget", "--verifier", "--search-option", "--verifier-option", "--format"} <= submit


def test_the_queue_commands_do_not_import_the_main_cli():
    """issue 17 item 8: server.cli <-> server.queue.cli was an import cycle (a private _parse_option)."""
    tree = ast.parse((ROOT / "server" / "queue" / "cli.py").read_text())
    imported = {(node.module or "", node.level) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert ("cli", 2) not in imported and ("server.cli", 0) not in imported


def test_text_results_go_to_stdout_without_out(tmp_path):
    from server.cli import _default_out

    args = build_parser().parse_args(["generate", "--model", "text-mdm"])
    assert _default_out(args, text=True) is None
    assert _default_out(args, text=False) == Path("grid.png")
    args = build_parser().parse_args(["generate", "--model", "m", "--format", "npy"])
    assert _default_out(args, text=False) == Path("samples.npy")


def test_in_process_generate_limits_torch_threads(tmp_path):
    args = build_parser().parse_args(["generate", "--model", "m"])
    assert args.threads == 1


def _default_sigint():
    """In the child: SIGINT as in a terminal (a test runner started in the background passes it on ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_job_watch_exits_quietly(tmp_path):
    with redis_server(tmp_path / "redis") as redis:
        config = settings(redis.url)
        with jobs_server({"gmm": gmm_model()}, config) as (stub, _, address):
            from tests.queue_fixtures import jpb

            job = stub.SubmitJob(jpb.SubmitJobRequest(request=pb.GenerateRequest(model="gmm", num_samples=4)))
            proc = subprocess.Popen([sys.executable, "-m", "server.cli", "job", job.id, "--watch", "--server",
                                     address], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, preexec_fn=_default_sigint,
                                    start_new_session=True)  # no terminal job control, however CI runs us
            try:
                first = ""
                end = time.monotonic() + 120
                while not first and time.monotonic() < end and proc.poll() is None:  # the progress bar: watching
                    if select.select([proc.stderr], [], [], 0.5)[0]:
                        first = os.read(proc.stderr.fileno(), 4096).decode()
                assert first, "job --watch printed nothing"
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
    err = first + err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_the_cli_sends_typed_options(tmp_path, capsys):
    with running_server({"gmm": gmm_model()}) as srv:
        address = f"127.0.0.1:{srv.port}"
        assert main(["generate", "--server", address, "--model", "gmm", "--sampler", "ddim", "--steps", "2",
                     "--option", "eta=0.5", "--quiet", "--out", str(tmp_path / "g.png")]) == 0
        assert (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")
        assert main(["generate", "--server", address, "--model", "gmm", "--sampler", "ddim", "--steps", "2",
                     "--option", "eta=true", "--quiet"]) == 2
        assert capsys.readouterr().err.startswith("diffserve: error: INVALID_ARGUMENT: ")
    with pytest.raises(SystemExit):
        main(["generate", "--model", "gmm", "--option", "eta"])
    assert "argument --option: 'eta': expected KEY=VALUE" in capsys.readouterr().err
