"`weightwatch directions` run as a user would, and its file read back without weightwatch (the interchange format)."
import json, shutil, subprocess
import pytest, torch
from safetensors import safe_open
from weightwatch_nb.core import make_tiny_checkpoint
from weightwatch_nb.delta import plant_update

def run(*args):
    exe = shutil.which('weightwatch')
    assert exe, "the `weightwatch` console script is not installed: run `pip install -e .[dev]`"
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=600)

@pytest.fixture(scope='module')
def pair(tmp_path_factory):
    t = tmp_path_factory.mktemp('pair')
    b = make_tiny_checkpoint(t/'base', 'gpt2')
    plant_update(b, t/'ft', {(0, 'mlp_out'): 2, (1, 'attn_out'): 3})
    return b, t/'ft'

def test_help():
    r = run('directions', '--help')
    assert r.returncode == 0
    for opt in ('BASE', 'FINETUNED', '--k', '--matrices', '--exact', '--randomized', '--mode', '--lora', '--device'): assert opt in r.stdout

def test_writes_interchange_format(pair, tmp_path):
    out = tmp_path/'d.safetensors'
    r = run('directions', *pair, '-o', out, '--k', 4, '--matrices', 'attn_out,mlp_out', '--exact')
    assert r.returncode == 0, r.stderr
    assert 'wrote' in r.stdout
    with safe_open(str(out), 'pt') as fh:
        md, names = fh.metadata(), sorted(fh.keys())
        tensors = {k: fh.get_tensor(k) for k in names}
    assert md['format'] == 'weightwatch.directions' and json.loads(md['schema_version']) == 1
    assert md['hook_point'] == 'blocks.{layer}.hook_out' and md['mode'] == 'sub' and md['svd'] == 'exact' and json.loads(md['k']) == 4
    fps = json.loads(md['fingerprints'])
    assert set(fps) == {'base', 'finetuned'} and fps['base']['id'] != fps['finetuned']['id']
    assert names == ['L0.mlp_out', 'L0.mlp_out.S', 'L1.attn_out', 'L1.attn_out.S']   # only the planted matrices changed
    for n in ('L0.mlp_out', 'L1.attn_out'):
        v, s = tensors[n], tensors[n + '.S']
        assert v.dtype == s.dtype == torch.float32 and v.shape[1] == 64 and s.shape == (v.shape[0],)
        assert torch.allclose(v.norm(dim=1), torch.ones(v.shape[0]), atol=1e-5)
    assert tensors['L0.mlp_out'].shape[0] == 2 and tensors['L1.attn_out'].shape[0] == 3   # numerically zero directions dropped

@pytest.mark.parametrize('args,msg', [
    (lambda b, f: (b, b), 'equal the base weights'),
    (lambda b, f: (b, f, '--matrices', 'mlp_gate'), 'gpt2 has no `mlp_gate`'),
    (lambda b, f: (b, str(f) + '_missing'), 'no such checkpoint directory'),
    (lambda b, f: (b, 'zoo:no_such_organism'), 'unknown zoo organism'),
    (lambda b, f: (b, f, '--device', 'gpu'), "'gpu' is not a torch device"),
    (lambda b, f: (b, f, '--device', 'meta'), "the 'meta' device holds no weights"),
])
def test_errors_are_one_clear_line(pair, tmp_path, args, msg):
    r = run('directions', *args(*pair), '-o', tmp_path/'x.safetensors', '--quiet')
    assert r.returncode == 2, r.stderr
    assert 'Traceback' not in r.stderr and msg in r.stderr
    assert not (tmp_path/'x.safetensors').exists()

def test_device_option_gives_the_same_file(pair, tmp_path):
    a, b = tmp_path/'a.safetensors', tmp_path/'b.safetensors'
    assert run('directions', *pair, '-o', a, '--k', 3, '--quiet').returncode == 0
    r = run('directions', *pair, '-o', b, '--k', 3, '--quiet', '--device', 'cpu')
    assert r.returncode == 0, r.stderr
    with safe_open(str(a), 'pt') as fa, safe_open(str(b), 'pt') as fb:
        assert fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys(): assert torch.equal(fa.get_tensor(k), fb.get_tensor(k))
