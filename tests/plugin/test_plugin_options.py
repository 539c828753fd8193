"""Plugin options: visible in --help, read from ini, overridden by the command line, validated."""

from __future__ import annotations

import pytest

PRINT_CONFIG = """
def test_show(katamaran_config):
    c = katamaran_config
    print(f"CFG nodes={c.nodes} image={c.node_image} accel={c.accel} "
          f"keep={c.keep_on_failure} interval={c.ping_interval} results={c.results_dir}")
"""

INI = """
[pytest]
katamaran_node_image = ubuntu
katamaran_accel = tcg
katamaran_keep_on_failure = true
katamaran_ping_interval = 0.05
katamaran_results_dir = out/ini-results
"""


def test_options_in_help(pytester: pytest.Pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*katamaran*"])
    out = result.stdout.str()
    for opt in (
        "--nodes=",
        "--node-image=",
        "--accel=",
        "--keep-nodes-on-failure",
        "--ping-interval=",
        "--results-dir=",
        "katamaran_nodes",
        "katamaran_node_image",
        "katamaran_accel",
        "katamaran_keep_on_failure",
        "katamaran_ping_interval",
        "katamaran_results_dir",
    ):
        assert opt in out, opt


def test_defaults(pytester: pytest.Pytester):
    pytester.makepyfile(PRINT_CONFIG)
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            f"*CFG nodes=None image=debian accel=auto keep=False interval=0.01 "
            f"results={pytester.path / 'results'}"
        ]
    )
    result.stdout.fnmatch_lines(["katamaran: nodes=none image=debian accel=auto*"])


def test_ini_values_are_read(pytester: pytest.Pytester):
    pytester.makeini(INI)
    pytester.makepyfile(PRINT_CONFIG)
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            f"*CFG nodes=None image=ubuntu accel=tcg keep=True interval=0.05 "
            f"results={pytester.path / 'out' / 'ini-results'}"
        ]
    )


def test_command_line_overrides_ini(pytester: pytest.Pytester):
    pytester.makeini(INI)
    pytester.makepyfile(PRINT_CONFIG)
    result = pytester.runpytest(
        "-s",
        "--node-image=debian",
        "--accel=auto",
        "--ping-interval=0.2",
        "--results-dir=cli-results",
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            f"*CFG nodes=None image=debian accel=auto keep=True interval=0.2 "
            f"results={pytester.path / 'cli-results'}"
        ]
    )


def test_nodes_none_overrides_ini_nodes(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nkatamaran_nodes = qemu\n")
    pytester.makepyfile(PRINT_CONFIG)
    result = pytester.runpytest("-s", "--nodes=none")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*CFG nodes=None *"])


def test_unknown_nodes_backend_is_a_usage_error(pytester: pytest.Pytester):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("--nodes=bogus")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*argument --nodes: invalid choice: 'bogus' (choose from*qemu*"])


def test_unknown_nodes_backend_in_ini_is_a_usage_error(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nkatamaran_nodes = bogus\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*katamaran: unknown nodes backend 'bogus' (ini katamaran_nodes); choose from: qemu"]
    )


@pytest.mark.parametrize("value", ["fast", "0", "-1"])
def test_bad_ping_interval_is_a_usage_error(pytester: pytest.Pytester, value):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest(f"--ping-interval={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*katamaran: ping interval must be*"])


def test_bad_image_in_ini_is_a_usage_error(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nkatamaran_node_image = centos\n")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*unknown node image 'centos' (ini katamaran_node_image); choose from: debian, ubuntu"]
    )


def test_pyproject_settings_are_read(pytester: pytest.Pytester):
    pytester.makepyprojecttoml(
        """
        [tool.pytest.ini_options]
        katamaran_ping_interval = 0.5
        katamaran_keep_on_failure = true
        """
    )
    pytester.makepyfile(PRINT_CONFIG)
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*CFG * keep=True interval=0.5 *"])


def test_sigterm_interrupts_this_process_but_kills_a_forked_child():
    """pyroute2's netns.create forks a helper and stops it with SIGTERM: the helper must
    die, not raise KeyboardInterrupt and run pytest's teardown in the child."""
    import os
    import signal

    from pytest_katamaran.pluginstate import TermAsInterrupt as _TermAsInterrupt

    with _TermAsInterrupt():
        pid = os.fork()
        if pid == 0:  # child: what pyroute2's helper sees when stopped
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                signal.pause()
            except KeyboardInterrupt:
                os._exit(3)  # the bug: the child would go on as a pytest process
            os._exit(4)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()
