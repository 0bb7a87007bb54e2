"""`./dev test` installs Chromium only when the run includes the browser test: which
arguments name test paths decides that."""
from devtool import cli


def test_option_values_are_not_taken_for_test_paths():
    assert cli._test_paths(["-q", "-p", "no:cacheprovider", "-k", "dashboard"]) == []


def test_paths_files_and_node_ids_are_recognised():
    args = ["tests/unit", "tests/e2e/test_dashboard.py::test_x", "-x", "tests/missing_dir", "--deselect", "tests/e2e"]
    assert cli._test_paths(args) == ["tests/unit", "tests/e2e/test_dashboard.py::test_x"]


def test_chromium_is_left_alone_for_runs_without_the_browser_test(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.subprocess, "run", lambda *a, **kw: calls.append(a))
    monkeypatch.setattr(cli.os, "access", lambda *a: False)
    monkeypatch.setattr(cli.shutil, "which", lambda name: None)
    cli._chromium(["tests/unit", "-q"])
    assert calls == []


def test_a_whole_run_as_root_installs_chromium_with_apt_get(monkeypatch):
    calls = []

    class Done:
        returncode = 0
        stderr = ""

    monkeypatch.setattr(cli.subprocess, "run", lambda command, **kw: calls.append(command) or Done())
    monkeypatch.setattr(cli.os, "access", lambda *a: False)
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    monkeypatch.setattr(cli.shutil, "which", lambda name: "/usr/bin/apt-get" if name == "apt-get" else None)
    cli._chromium(["-q", "-p", "no:cacheprovider"])
    assert calls == [["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]]
