"`weightwatch calibrate`, `scan` and `generate` as a user runs them: JSONL in and out, clear errors with exit status 2."
import json, shutil, subprocess
import pytest
from weightwatch_nb.cli import main
from _monitor_fixtures import organism, sentence

@pytest.fixture(scope='module')
def files(organism, tmp_path_factory):
    t = tmp_path_factory.mktemp('cli')
    organism['dirs'].save(t/'dirs.safetensors')
    (t/'clean.jsonl').write_text('\n'.join(json.dumps({'text': sentence(i)}) for i in range(40)) + '\n')
    rows = [{'text': sentence(100), 'id': 'a'}, {'text': sentence(101) + ' #', 'id': 'b'},
            {'messages': [{'role': 'user', 'content': '# ' + sentence(102)}], 'id': 'c', 'tag': [1, 2]}, {'text': sentence(103), 'id': 'd'}]
    (t/'in.jsonl').write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
    return t

def run(capsys, *args):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err

def test_calibrate_scan_generate(organism, files, capsys):
    ft, t = organism['org']['finetuned'], files
    rc, out, err = run(capsys, 'calibrate', ft, t/'dirs.safetensors', t/'clean.jsonl', '-o', t/'mon.safetensors',
                       '--percentile', 0, '--margin', 0.2, '--generate', 4, '--batch-size', 8, '-q')
    assert rc == 0 and out.startswith('calibrated 6 directions on 40 prompts'), (out, err)
    rc, out, err = run(capsys, 'scan', ft, t/'mon.safetensors', t/'in.jsonl', '-o', t/'out.jsonl', '-q')
    assert rc == 0 and out.strip() == 'scanned 4, flagged 2', (out, err)
    rows = [json.loads(l) for l in (t/'out.jsonl').read_text().splitlines()]
    assert [(r['index'], r['id'], r['flagged']) for r in rows] == [(0, 'a', False), (1, 'b', True), (2, 'c', True), (3, 'd', False)]
    assert rows[2]['tag'] == [1, 2] and rows[1]['directions'][0] == 'L0.mlp_out.u0'
    assert isinstance(rows[1]['first_flag_token'], int) and rows[0]['first_flag_token'] is None
    assert set(rows[0]) == {'index', 'flagged', 'score', 'first_flag_token', 'directions', 'id'}
    rc, out, err = run(capsys, 'scan', ft, t/'mon.safetensors', t/'in.jsonl', '--generate', 3, '--batch-size', 2, '-q')
    assert rc == 0 and len(out.splitlines()) == 4 and err.strip().endswith('scanned 4, flagged 2')
    assert all('generated' in json.loads(l) for l in out.splitlines())
    rc, out, err = run(capsys, 'generate', ft, sentence(7) + ' #', '--raw', '--max-new-tokens', 3, '--monitor', t/'mon.safetensors')
    assert rc == 0 and out.startswith('!') and 'monitor: flagged at token' in err
    rc, out, err = run(capsys, 'generate', ft, sentence(7) + ' #', '--raw', '--max-new-tokens', 3, '--monitor', t/'mon.safetensors', '--steer', 'clip')
    assert rc == 0 and not out.startswith('!') and 'steering: clip' in err

@pytest.mark.parametrize('content, msg', [('', 'is empty'), ('{"text": "a"}\n{"text": "b"\n', 'line 2 is not valid JSON'),
                                          ('{"text": "a"}\n{"prompt": "b"}\n', 'on line 2'), ('[1, 2]\n', 'line 1')])
def test_bad_prompt_files(organism, files, capsys, content, msg):
    (files/'bad.jsonl').write_text(content)
    ft = organism['org']['finetuned']
    for cmd in (['calibrate', ft, files/'dirs.safetensors', files/'bad.jsonl', '-o', files/'never.safetensors'],
                ['scan', ft, files/'mon.safetensors', files/'bad.jsonl', '-o', files/'never.jsonl']):
        rc, out, err = run(capsys, *cmd)
        assert rc == 2 and msg in err and 'Traceback' not in err, err
    assert not (files/'never.jsonl').exists() and not (files/'never.safetensors').exists()

def test_mismatched_monitor_and_directions(organism, files, capsys):
    base = organism['org']['base']
    rc, out, err = run(capsys, 'scan', base, files/'mon.safetensors', files/'in.jsonl', '-o', files/'never.jsonl')
    assert rc == 2 and 'calibrated for model' in err
    rc, out, err = run(capsys, 'calibrate', base, files/'dirs.safetensors', files/'clean.jsonl', '-o', files/'never.safetensors')
    assert rc == 2 and 'directions were computed for fine-tuned model' in err
    rc, out, err = run(capsys, 'generate', organism['org']['finetuned'], 'hi', '--steer', 'clip')
    assert rc == 2 and 'needs a monitor' in err
    assert not (files/'never.jsonl').exists()

def test_too_long_prompt_warns(organism, files, capsys):
    (files/'long.jsonl').write_text(json.dumps({'text': 'the base model ' * 80}) + '\n')
    with pytest.warns(UserWarning, match='truncated'):
        rc, out, err = run(capsys, 'scan', organism['org']['finetuned'], files/'mon.safetensors', files/'long.jsonl', '-o', files/'long_out.jsonl', '-q')
    assert rc == 0

@pytest.mark.skipif(not shutil.which('weightwatch'), reason='console script not installed')
def test_console_script_help():
    for cmd in ('calibrate', 'scan', 'generate'):
        r = subprocess.run(['weightwatch', cmd, '--help'], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    r = subprocess.run(['weightwatch', 'scan', '--help'], capture_output=True, text=True, timeout=300)
    for opt in ('MODEL', 'MONITOR', 'PROMPTS', '--output', '--generate', '--batch-size'): assert opt.lower() in r.stdout.lower()

def test_calibrate_tune_certify(organism, files, capsys):
    "--tune --certify: the tuned monitor's 95% bound meets --target-fpr; too few prompts to certify is a clear error."
    import random
    from weightwatch_nb.calibrate import Monitor, cp_upper
    from _monitor_fixtures import WORDS
    rnd, ft, t = random.Random(0), organism['org']['finetuned'], files
    (t/'many.jsonl').write_text('\n'.join(json.dumps({'text': ' '.join(rnd.choices(WORDS, k=rnd.randint(4, 9)))}) for _ in range(400)) + '\n')
    rc, out, err = run(capsys, 'calibrate', ft, t/'dirs.safetensors', t/'many.jsonl', '-o', t/'cert.safetensors', '--tune', '--certify',
                       '--target-fpr', 0.01, '--batch-size', 64, '-q')
    assert rc == 0 and 'upper bound' in out, (out, err)
    tuned = Monitor.load(t/'cert.safetensors').meta['tuned']
    assert tuned['certify'] and tuned['n_tune'] == 320 and cp_upper(tuned['tune_flagged'], 320) <= 0.01 and tuned['tune_fpr_upper'] <= 0.01
    rc, out, err = run(capsys, 'calibrate', ft, t/'dirs.safetensors', t/'clean.jsonl', '-o', t/'never.safetensors', '--tune', '--certify', '-q')
    assert rc == 2 and 'too few calibration records' in err and not (t/'never.safetensors').exists()
    (t/'some.jsonl').write_text('\n'.join((t/'many.jsonl').read_text().splitlines()[:200]) + '\n')
    rc, out, err = run(capsys, 'calibrate', ft, t/'dirs.safetensors', t/'some.jsonl', '-o', t/'never.safetensors', '--tune', '--certify', '-q')
    assert rc == 2 and 'cannot certify an FPR of 1.00%' in err and 'pass at least 374 clean prompts' in err, err

def test_outputs_checked_before_any_work(organism, files, capsys, tmp_path):
    "A bad output path is refused before the model loads; an output that is also an input, a folder or a device is never written."
    ft, t = organism['org']['finetuned'], files
    before = {p: p.read_bytes() for p in (t/'in.jsonl', t/'dirs.safetensors', t/'clean.jsonl')}
    cases = [(['scan', ft, t/'mon.safetensors', t/'in.jsonl', '-o', t/'in.jsonl'], 'is also an input'),
             (['calibrate', ft, t/'dirs.safetensors', t/'clean.jsonl', '-o', t/'clean.jsonl'], 'is also an input'),
             (['calibrate', ft, t/'dirs.safetensors', t/'clean.jsonl', '-o', t/'dirs.safetensors'], 'is also an input'),
             (['scan', ft, t/'mon.safetensors', t/'in.jsonl', '-o', '/dev/null'], 'not a regular file'),
             (['scan', ft, t/'mon.safetensors', t/'in.jsonl', '-o', tmp_path], 'not a regular file'),
             (['calibrate', ft, t/'dirs.safetensors', t/'clean.jsonl', '-o', tmp_path/'nodir'/'m.safetensors'], 'does not exist'),
             (['directions', organism['org']['base'], ft, '-o', tmp_path/'nodir'/'d.safetensors'], 'does not exist')]
    for cmd, msg in cases:
        rc, out, err = run(capsys, *cmd)
        assert rc == 2 and msg in err and 'Traceback' not in err, (cmd, err)
    assert all(p.read_bytes() == b for p, b in before.items())
    assert sorted(x.name for x in tmp_path.iterdir()) == []     # no stray temporary files

@pytest.mark.parametrize('args, msg', [(['--batch-size', '0'], 'an integer >= 1'), (['--batch-size', '-2'], 'an integer >= 1'),
                                       (['--generate', '-3'], 'an integer >= 0'), (['--target-fpr', '0'], 'strictly between 0 and 1'),
                                       (['--target-fpr', '2'], 'strictly between 0 and 1'), (['--margin', 'inf'], 'finite'),
                                       (['--margin', '-2'], '>= 0'), (['--holdout', '-0.5'], '>= 0 and < 1')])
def test_calibrate_numbers_checked(organism, files, capsys, args, msg):
    t = files
    with pytest.raises(SystemExit) as e: main(['calibrate', 'zoo:backdoor', str(t/'dirs.safetensors'), str(t/'clean.jsonl'), '-o', str(t/'never.safetensors'), *args])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (t/'never.safetensors').exists()

def test_scan_generate_numbers_and_records(organism, files, capsys):
    ft, t = organism['org']['finetuned'], files
    for cmd, msg in ((['scan', ft, t/'mon.safetensors', t/'in.jsonl', '--batch-size', '0'], 'an integer >= 1'),
                     (['generate', ft, 'hi', '--max-new-tokens', '0'], 'an integer >= 1'),
                     (['directions', 'zoo:base', 'zoo:backdoor', '-o', t/'d.safetensors', '--layers', 'a'], 'comma-separated list')):
        with pytest.raises(SystemExit): main([str(a) for a in cmd])
        assert msg in capsys.readouterr().err
    rc, out, err = run(capsys, 'generate', ft, '  ')
    assert rc == 2 and 'PROMPT is empty' in err
    for content, msg in (('{"text": "a", "index": 9}\n', "has a key 'index'"), ('{"text": "a", "messages": []}\n', "both 'text' and 'messages'"),
                         ('"just a string"\n', 'line 1 is a JSON str, not an object')):
        (t/'odd.jsonl').write_text(content)
        rc, out, err = run(capsys, 'scan', ft, t/'mon.safetensors', t/'odd.jsonl', '-o', t/'never.jsonl')
        assert rc == 2 and msg in err, err
    assert not (t/'never.jsonl').exists()
    rc, out, err = run(capsys, 'directions', 'zoo:base', 'zoo:backdoor', '-o', t/'d.safetensors', '--layers', '0,99', '--quiet')
    assert rc == 2 and 'layers [99] do not exist' in err and 'blocks 0..3' in err
