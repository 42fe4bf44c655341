#!/usr/bin/env python
"Write README.md from nbs/index.ipynb without Quarto (`nbdev_readme` needs Quarto): markdown as is, visible code and its text outputs."
import json, re, sys
from pathlib import Path

def render(nb_path:Path)->str:
    nb, out = json.loads(nb_path.read_text()), []
    for c in nb['cells']:
        src = ''.join(c['source'])
        if c['cell_type'] == 'markdown': out.append(src.strip()); continue
        if c['cell_type'] != 'code' or re.match(r'^\s*#\s*\|\s*hide', src): continue
        body = '\n'.join(l for l in src.splitlines() if not re.match(r'^\s*#\s*\|', l)).strip()
        if body: out.append(f"```python\n{body}\n```")
        for o in c.get('outputs', []):
            txt = o.get('text') or o.get('data', {}).get('text/markdown') or o.get('data', {}).get('text/plain')
            if txt: out.append(f"```\n{''.join(txt).rstrip()}\n```" if 'text/markdown' not in o.get('data', {}) else ''.join(txt).strip())
    return '\n\n'.join(out) + '\n'

if __name__ == '__main__':
    root = Path(__file__).resolve().parent.parent
    text = render(root/'nbs'/'index.ipynb')
    if '--check' in sys.argv:
        if (root/'README.md').read_text() != text: sys.exit("README.md is out of date with nbs/index.ipynb: run `python .ci/readme.py`")
    else: (root/'README.md').write_text(text)
