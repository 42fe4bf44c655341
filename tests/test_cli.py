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

def test_outputs_never_land_in_a_model_folder(tmp_path):
    "No command writes into, or replaces, a checkpoint folder it reads; the folder is left byte for byte."
    import hashlib
    from weightwatch_nb.core import make_tiny_checkpoint
    from weightwatch_nb.delta import plant_update
    base = make_tiny_checkpoint(tmp_path/'base', 'llama', n_layers=1)
    ft = tmp_path/'ft'; plant_update(base, ft, {(0, 'mlp_out'): 1})
    before = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in ft.iterdir()}
    for args in (('directions', str(base), str(ft), '-o', str(ft/'model.safetensors')),
                 ('edit', str(base), str(ft), '-o', str(ft), '--remove', '1', '--force'),
                 ('edit', str(base), str(ft), '-o', str(tmp_path), '--remove', '1', '--force')):   # a folder that holds both models
        r = run(*args)
        assert r.returncode == 2 and 'Traceback' not in r.stderr and 'model folder' in r.stderr, (args, r.stderr)
    assert {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in ft.iterdir()} == before


def test_warnings_name_the_library_they_come_from(monkeypatch, capsys):
    "Warnings of weightwatch read as the command's; another library's (transformers, PEFT) are named as that library's."
    import argparse, warnings as W
    import weightwatch_nb.cli as C
    def fake(args):
        W.warn_explicit('`x` is deprecated', FutureWarning, '/venv/lib/python3.11/site-packages/transformers/modeling_utils.py', 1)
        W.warn_explicit('the read side is skipped', UserWarning, '/somewhere/weightwatch_nb/demo.py', 1)
    def parser():
        ap = argparse.ArgumentParser(prog='weightwatch'); sub = ap.add_subparsers(dest='command')
        sub.add_parser('x').set_defaults(func=fake); return ap
    monkeypatch.setattr(C, 'build_parser', parser)
    with W.catch_warnings():
        W.simplefilter('always')   # shown as the command shows them (pytest would otherwise record them)
        W.showwarning = lambda m, c, f, l, file=None, line=None: sys.stderr.write(W.formatwarning(m, c, f, l, line))
        assert C.main(['x']) == 0
    err = capsys.readouterr().err
    assert 'weightwatch x: warning from transformers: `x` is deprecated' in err and 'weightwatch x: warning: the read side is skipped' in err, err
