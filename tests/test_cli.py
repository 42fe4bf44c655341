"The installed `weightwatch` console script, run as a user would from a shell."
import shutil, subprocess, sys
import pytest

def run(*args):
    exe = shutil.which('weightwatch')
    assert exe, "the `weightwatch` console script is not installed: run `pip install -e .[dev]`"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=600)

def test_help_lists_subcommands():
    r = run('--help')
    assert r.returncode == 0 and 'zoo' in r.stdout

def test_zoo_help():
    r = run('zoo', '--help')
    assert r.returncode == 0
    for sub in ('list', 'path', 'build', 'eval'): assert sub in r.stdout

def test_unknown_organism_is_one_clear_line():
    r = run('zoo', 'path', 'no_such_organism')
    assert r.returncode == 2
    assert 'Traceback' not in r.stderr
    assert 'unknown zoo organism' in r.stderr and 'backdoor' in r.stderr

def test_missing_subcommand_is_usage_error():
    r = run()
    assert r.returncode == 2 and 'usage' in r.stderr
